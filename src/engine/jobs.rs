//! The queue between the async service and an engine thread.
//!
//! [`Submitter`] is the service's side: it fails fast with [`Capacity::Queue`] when too
//! many replies wait, and hands each reply its event channel and cancel token. [`Intake`] is the
//! engine thread's side: it blocks while the engine is idle and releases waiting jobs as running
//! slots free up, oldest first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::canvas::Canvas;
use super::vocab::ChatModel;
use super::{
    Capacity, Completion, Engine, EngineError, EngineEvent, EngineInfo, GenerateRequest, ReplyStream, Revision,
    StopReason,
};

/// A reply request on its way to (or inside) an engine thread.
pub(crate) struct Job {
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    pub cancel: CancellationToken,
    pub queued_at: Instant,
}

impl Job {
    /// Whether the client cancelled or stopped listening.
    pub fn abandoned(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }

    pub fn fail(&self, error: EngineError) {
        let _ = self.events.send(EngineEvent::Failed(error));
    }

    /// Sends the whole reply after a step that unmasked `unmasked` positions, and the completion
    /// once nothing is masked. Returns whether the reply goes on.
    pub fn report_step(&self, canvas: &Canvas, chat: &ChatModel, placeholder: &str, unmasked: usize) -> bool {
        let revision = Revision {
            step: canvas.steps(),
            text: chat.render(canvas.tokens(), canvas.reply_len(), placeholder),
            masked: canvas.masked(),
            unmasked,
        };
        if self.events.send(EngineEvent::Revision(revision)).is_err() {
            return false;
        }
        if canvas.is_complete() {
            self.finish(canvas, chat, StopReason::Completed);
            return false;
        }
        true
    }

    /// Ends the reply with what `canvas` holds.
    pub fn finish(&self, canvas: &Canvas, chat: &ChatModel, reason: StopReason) {
        let _ = self.events.send(EngineEvent::Finished(Completion {
            reason,
            text: chat.render(canvas.tokens(), canvas.reply_len(), ""),
            completion_tokens: canvas.reply_len(),
            steps: canvas.steps(),
        }));
    }
}

/// An engine running on its own thread, fed by the queue.
pub(crate) struct EngineThread {
    submitter: Submitter,
    info: EngineInfo,
}

impl Engine for EngineThread {
    fn submit(&self, request: GenerateRequest) -> Result<ReplyStream, EngineError> {
        self.submitter.submit(request)
    }

    fn info(&self) -> &EngineInfo {
        &self.info
    }
}

/// Runs `body` on a new thread called `name`: it loads the model, reports the outcome through its
/// second argument, then serves the queue. Returns once the model is loaded (or failed to load).
pub(crate) fn spawn<F>(name: &str, max_waiting: usize, body: F) -> Result<EngineThread, EngineError>
where
    F: FnOnce(Intake, &dyn Fn(Result<EngineInfo, EngineError>)) + Send + 'static,
{
    let (submitter, intake) = queue(max_waiting);
    let (ready_tx, ready_rx) = std_mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            body(intake, &|outcome| {
                let _ = ready_tx.send(outcome);
            })
        })
        .map_err(|e| EngineError::Load {
            path: String::new(),
            reason: e.to_string(),
        })?;
    let info = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
    Ok(EngineThread { submitter, info })
}

/// A queue of at most `max_waiting` waiting jobs.
pub(crate) fn queue(max_waiting: usize) -> (Submitter, Intake) {
    let (tx, rx) = std_mpsc::channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    (
        Submitter {
            jobs: tx,
            waiting: waiting.clone(),
            max_waiting,
        },
        Intake {
            jobs: rx,
            waiting,
            queue: VecDeque::new(),
            open: true,
        },
    )
}

pub(crate) struct Submitter {
    jobs: std_mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl Submitter {
    pub fn submit(&self, request: GenerateRequest) -> Result<ReplyStream, EngineError> {
        let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
        if waiting >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Overloaded(Capacity::Queue { waiting }));
        }
        let (events, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let job = Job {
            request,
            events,
            cancel: cancel.clone(),
            queued_at: Instant::now(),
        };
        if self.jobs.send(job).is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        crate::metrics::engine_load(None, Some(waiting + 1));
        Ok(ReplyStream { events: rx, cancel })
    }
}

pub(crate) struct Intake {
    jobs: std_mpsc::Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    queue: VecDeque<Job>,
    /// False once every `Submitter` is gone.
    open: bool,
}

impl Intake {
    /// The jobs that may start now, at most `free`. Blocks while `running` is zero and nothing
    /// waits. `None` means the engine should stop: no replies run, none wait and no more can come.
    pub fn take(&mut self, running: usize, free: usize) -> Option<Vec<Job>> {
        if running == 0 && self.queue.is_empty() {
            if !self.open {
                return None;
            }
            match self.jobs.recv() {
                Ok(job) => self.queue.push_back(job),
                Err(_) => return None,
            }
        }
        loop {
            match self.jobs.try_recv() {
                Ok(job) => self.queue.push_back(job),
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    self.open = false;
                    break;
                }
            }
        }
        let n = free.min(self.queue.len());
        self.waiting.fetch_sub(n, Ordering::AcqRel);
        let started: Vec<Job> = self.queue.drain(..n).collect();
        crate::metrics::engine_load(
            Some(running + started.len()),
            Some(self.waiting.load(Ordering::Relaxed)),
        );
        Some(started)
    }
}
