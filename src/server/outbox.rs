//! A connection's outgoing side: a bounded queue of events drained by one writer task that owns
//! the socket's sink. Everything that writes to a client goes through an [`Outbox`].

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::sync::mpsc;

use crate::protocol::{ServerEvent, WireError};

/// What the writer task sends.
pub(super) enum Outgoing {
    /// Boxed: events are large beside the other items, and the queue holds many.
    Event(Box<ServerEvent>),
    Ping,
    Close(u16, &'static str),
}

/// Sending half used by the reader loop and the reply forwarders.
#[derive(Clone)]
pub(super) struct Outbox(mpsc::Sender<Outgoing>);

impl Outbox {
    /// An outbox of `capacity` queued items and the receiver [`write_loop`] drains.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self(tx), rx)
    }

    /// Sends an event, waiting for room. Returns false once the connection is gone.
    pub async fn send(&self, event: ServerEvent) -> bool {
        self.0.send(Outgoing::Event(Box::new(event))).await.is_ok()
    }

    /// Sends an event only if there is room right now; returns whether it was queued.
    pub fn try_send(&self, event: ServerEvent) -> bool {
        self.0.try_send(Outgoing::Event(Box::new(event))).is_ok()
    }

    pub async fn error(&self, error: WireError) {
        crate::metrics::error(error.code.as_str());
        self.send(ServerEvent::Error { error }).await;
    }

    pub async fn ping(&self) {
        let _ = self.0.send(Outgoing::Ping).await;
    }

    pub async fn close(&self, code: u16, reason: &'static str) {
        let _ = self.0.send(Outgoing::Close(code, reason)).await;
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Writes queued items to the socket until the queue closes, a close frame went out, or the
/// peer is gone.
pub(super) async fn write_loop(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let message = match out {
            Outgoing::Event(event) => match serde_json::to_string(&event) {
                Ok(text) => Message::Text(text.into()),
                Err(e) => {
                    tracing::error!(error = %e, "event did not serialize");
                    continue;
                }
            },
            Outgoing::Ping => Message::Ping(Default::default()),
            Outgoing::Close(code, reason) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    })))
                    .await;
                break;
            }
        };
        if sink.send(message).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}
