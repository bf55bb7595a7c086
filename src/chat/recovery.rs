//! Recovery of replies whose generator was lost: every replica looks, every
//! `chat.recovery_interval_ms`, for running replies whose session lease expired (the replica
//! that generated them died, or stalled past its lease) and ends them as `generator_lost`: a
//! failed assistant message that later prompts leave out, and a terminal event in the reply log
//! that reaches every watcher. The store makes the ending a compare-and-set on the lease's
//! token, so when several replicas look at once exactly one ends it.

use std::sync::Arc;
use std::time::Duration;

use super::events::ReplyEvent;
use super::reply::{logged, lost};
use super::Core;
use crate::sessions::{MessageStatus, Role, RunningReply, StoreError, StoredMessage};

/// Replies recovered per round at most; the next round takes the rest.
const BATCH: usize = 32;

pub(super) async fn run(core: Arc<Core>) {
    let every = Duration::from_millis(core.config.recovery_interval_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = core.shutdown.cancelled() => return,
        }
        match core.store.expired_replies(BATCH).await {
            Ok(replies) => {
                for reply in replies {
                    if let Err(e) = recover(&core, &reply).await {
                        tracing::warn!(session = %reply.session_id, error = %e, "recovering a lost reply failed");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "looking for lost replies failed"),
        }
    }
}

async fn recover(core: &Core, reply: &RunningReply) -> Result<(), StoreError> {
    let revisions = match core.store.reply_log(&reply.response_id).await? {
        Some(log) => log
            .newest
            .iter()
            .filter_map(|e| serde_json::from_str::<ReplyEvent>(&e.payload).ok())
            .filter_map(|e| match e {
                ReplyEvent::Revision(r) => Some(r.revision),
                ReplyEvent::Done(_) => None,
            })
            .max()
            .unwrap_or(0),
        None => 0,
    };
    let done = ReplyEvent::Done(lost(
        revisions,
        &format!(
            "the replica generating this reply ({}) stopped answering; send the message again",
            reply.replica
        ),
    ));
    let message = StoredMessage::new(Role::Assistant, String::new(), Some(MessageStatus::Failed), None);
    if core.store.recover_reply(reply, message, &logged(&done)).await? {
        crate::metrics::reply_recovered();
        tracing::info!(session = %reply.session_id, response = %reply.response_id, replica = %reply.replica,
            "ended a reply whose generator was lost");
    }
    Ok(())
}
