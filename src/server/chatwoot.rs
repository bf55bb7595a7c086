//! The Chatwoot agent bot: `POST /integrations/chatwoot?secret=…` receives Chatwoot's agent-bot
//! webhook, and each incoming message of a conversation is answered through the conversation
//! core like any other front end's. A thin translator again: the Chatwoot conversation is the
//! session (by alias), the Chatwoot message id is the `client_message_id` (so a webhook delivered
//! twice is answered once), and the final text goes back through Chatwoot's messages API.
//!
//! Chatwoot has no streaming: the bot sets typing on, waits for the reply's end, posts the text
//! once and sets typing off. A reply the core marks as a hand-over (`chat.handover_phrases`)
//! sets the conversation `open`, so an agent picks it up.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::chat::{ChatEvent, MessageOptions, NewMessage, ReplyEvent, ReplyStatus};
use crate::config::ChatwootConfig;

/// The owner Chatwoot's sessions are recorded under.
const OWNER: &str = "chatwoot";

/// Calls of Chatwoot's API, as the agent bot.
pub(crate) struct ChatwootClient {
    http: reqwest::Client,
    base: String,
    account: u64,
    token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatwootError {
    #[error("calling Chatwoot: {0}")]
    Http(#[from] reqwest::Error),
    #[error("Chatwoot answered {status} to {path}")]
    Status { status: u16, path: String },
}

impl ChatwootClient {
    pub fn new(config: &ChatwootConfig) -> Result<Self, ChatwootError> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_millis(config.request_timeout_ms))
                .build()?,
            base: config.base_url.trim_end_matches('/').to_owned(),
            account: config.account_id,
            token: config.bot_token.clone(),
        })
    }

    async fn post(&self, conversation: u64, action: &str, body: Value) -> Result<(), ChatwootError> {
        let path = format!(
            "/api/v1/accounts/{}/conversations/{conversation}/{action}",
            self.account
        );
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("api_access_token", &self.token)
            .json(&body)
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(ChatwootError::Status {
                status: response.status().as_u16(),
                path,
            });
        }
        Ok(())
    }

    async fn typing(&self, conversation: u64, on: bool) {
        let status = if on { "on" } else { "off" };
        if let Err(e) = self
            .post(conversation, "toggle_typing_status", json!({"typing_status": status}))
            .await
        {
            tracing::warn!(conversation, error = %e, "typing status not set");
        }
    }
}

#[derive(Deserialize)]
pub(super) struct WebhookParams {
    #[serde(default)]
    secret: String,
}

/// The fields of Chatwoot's webhook the bot reads; the rest is ignored.
#[derive(Deserialize)]
struct Webhook {
    event: String,
    #[serde(default)]
    message_type: Value,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    conversation: Option<Conversation>,
}

#[derive(Deserialize)]
struct Conversation {
    id: u64,
}

impl Webhook {
    /// A message a contact wrote (`incoming`; Chatwoot sends the type as a word or as 0). The
    /// bot's own messages come back as `outgoing` and must not be answered.
    fn incoming(&self) -> bool {
        self.event == "message_created" && (self.message_type == "incoming" || self.message_type == 0)
    }
}

fn status(code: StatusCode, what: &str) -> Response {
    (code, Json(json!({"status": what}))).into_response()
}

/// `POST /integrations/chatwoot`: answers at once; the reply is posted to Chatwoot when done.
pub(super) async fn webhook(
    State(state): State<Arc<AppState>>,
    Query(params): Query<WebhookParams>,
    body: Bytes,
) -> Response {
    let Some(client) = state.chatwoot.clone() else {
        return status(
            StatusCode::NOT_FOUND,
            "the Chatwoot bot is not enabled (chatwoot.enabled)",
        );
    };
    let expected = state.config.chatwoot.webhook_secret.as_bytes();
    if !bool::from(params.secret.as_bytes().ct_eq(expected)) {
        return status(StatusCode::UNAUTHORIZED, "wrong or missing secret");
    }
    let hook: Webhook = match serde_json::from_slice(&body) {
        Ok(h) => h,
        Err(e) => return status(StatusCode::BAD_REQUEST, &format!("not a Chatwoot webhook: {e}")),
    };
    let (Some(message_id), Some(conversation), Some(content)) =
        (hook.id, hook.conversation.as_ref(), hook.content.as_ref())
    else {
        return status(StatusCode::OK, "ignored");
    };
    if !hook.incoming() || content.trim().is_empty() {
        return status(StatusCode::OK, "ignored");
    }
    let (conversation, content) = (conversation.id, content.clone());
    tokio::spawn(async move { answer(&state, &client, conversation, message_id, content).await });
    status(StatusCode::ACCEPTED, "accepted")
}

/// Generates the reply to one incoming message and posts it.
async fn answer(state: &AppState, client: &ChatwootClient, conversation: u64, message_id: u64, content: String) {
    let chat = &state.chat;
    let alias = format!("chatwoot:{}:{conversation}", client.account);
    let session = match chat
        .session_by_alias(OWNER, &alias, json!({"chatwoot_conversation": conversation}))
        .await
    {
        Ok(s) => s,
        Err(e) => return tracing::warn!(conversation, error = %e, "no session for the Chatwoot conversation"),
    };
    let message = NewMessage {
        session_id: session.id,
        content,
        client_message_id: Some(format!("chatwoot:{message_id}")),
        options: MessageOptions::default(),
    };
    let message = match chat.validator().message(message) {
        Ok(m) => m,
        Err(e) => return tracing::warn!(conversation, error = %e, "Chatwoot message refused"),
    };
    client.typing(conversation, true).await;
    let reply = match chat.send(OWNER, message).await {
        Ok(mut events) => loop {
            match events.next().await {
                Some(ChatEvent::Reply(ReplyEvent::Done(done))) if done.status == ReplyStatus::Completed => {
                    break Some((done.text, done.handover))
                }
                Some(ChatEvent::Refused(e)) => {
                    tracing::warn!(conversation, error = %e, "no reply for the Chatwoot message");
                    break None;
                }
                // An answered resend ends after `Accepted`; a failed reply posts nothing.
                None | Some(ChatEvent::Reply(ReplyEvent::Done(_))) => break None,
                Some(_) => continue,
            }
        },
        Err(e) => {
            tracing::warn!(conversation, error = %e, "no reply for the Chatwoot message");
            None
        }
    };
    if let Some((text, handover)) = reply.filter(|(t, _)| !t.trim().is_empty()) {
        let posted = client
            .post(
                conversation,
                "messages",
                json!({"content": text, "message_type": "outgoing"}),
            )
            .await;
        if let Err(e) = posted {
            tracing::warn!(conversation, error = %e, "reply not posted to Chatwoot");
        }
        if handover {
            if let Err(e) = client
                .post(conversation, "toggle_status", json!({"status": "open"}))
                .await
            {
                tracing::warn!(conversation, error = %e, "conversation not handed over");
            }
        }
    }
    client.typing(conversation, false).await;
}
