//! One reply's events onto a connection, for the client that asked for it and for every client
//! that resumed it.
//!
//! Slow readers: when the connection's queue is full, intermediate revisions are skipped (each
//! carries the whole reply); the newest revision and `response.done` always go out, waiting for
//! room.

use super::errors;
use super::outbox::Outbox;
use crate::chat::{ChatEvent, ChatStream, ReplyEvent, ReplyStatus, ReplyWatch};
use crate::protocol::ServerEvent;

/// Where the events come from: the stream of a message this connection sent, or a watch of a
/// reply it resumed.
pub(super) enum Source {
    Sent(ChatStream),
    Watch(ReplyWatch),
}

impl Source {
    async fn next(&mut self) -> Option<ReplyEvent> {
        match self {
            Source::Sent(stream) => loop {
                if let ChatEvent::Reply(e) = stream.next().await? {
                    return Some(e);
                }
            },
            Source::Watch(watch) => watch.next().await,
        }
    }
}

/// Forwards until the reply's end. `event_id` is the asking client's, echoed on errors.
pub(super) async fn forward(outbox: Outbox, response_id: String, mut source: Source, event_id: Option<String>) {
    let mut skipped: Option<ServerEvent> = None;
    while let Some(event) = source.next().await {
        match event {
            ReplyEvent::Revision(r) => {
                let event = ServerEvent::ResponseRevision {
                    response_id: response_id.clone(),
                    revision: r.revision,
                    step: r.step,
                    text: r.text,
                    masked: r.masked,
                };
                if outbox.try_send(event.clone()) {
                    skipped = None;
                } else {
                    crate::metrics::revisions_skipped(1);
                    skipped = Some(event);
                }
            }
            ReplyEvent::Done(done) => {
                if let Some(event) = skipped.take() {
                    outbox.send(event).await;
                }
                let error = done
                    .error
                    .as_ref()
                    .map(|f| errors::from_failure(f).with_event_id(event_id.clone()));
                if let Some(error) = &error {
                    outbox.error(error.clone()).await;
                }
                let failed = done.status == ReplyStatus::Failed;
                outbox
                    .send(ServerEvent::ResponseDone {
                        response_id,
                        status: done.status,
                        text: done.text,
                        usage: done.usage,
                        timings: done.timings,
                        handover: done.handover,
                        error: error.filter(|_| failed),
                    })
                    .await;
                return;
            }
        }
        if outbox.is_closed() {
            return;
        }
    }
}
