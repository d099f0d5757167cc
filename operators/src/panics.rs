//! Scoped panic handling.
//!
//! The panic hook is one per process, but several parts of leverflow want
//! to treat some panics specially for a while: the state store silences the
//! panics redb raises while it opens a damaged file (and reports them as an
//! error), and the timely executors record their threads' panics (message
//! and location) to report them instead of printing them.  Swapping the
//! process-wide hook for each of those (take, set, restore) races when two
//! threads do it at once (tests run many at a time): a restore can remove
//! another thread's hook, or leave a stale one installed for good.
//!
//! So one dispatcher hook is installed once, in front of whatever hook the
//! process had; handlers are registered for a scope and removed when their
//! guard drops:
//!
//! * [`on_this_thread`]: consulted only for panics of the registering
//!   thread (newest first);
//! * [`on_any_thread`]: consulted for panics of threads that have no thread
//!   handler taking them (timely's communication threads, which leverflow
//!   does not spawn itself).
//!
//! A handler returns whether it took the panic; a panic nobody takes goes
//! to the previous hook (by default: printed on stderr) unchanged.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::panic::PanicHookInfo;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

/// A panic handler: returns `true` when it took the panic (the previous
/// hook then does not see it).
type Handler = Arc<dyn Fn(&PanicHookInfo<'_>) -> bool + Send + Sync>;

thread_local! {
    static THREAD_HANDLERS: RefCell<Vec<(u64, Handler)>> = const { RefCell::new(Vec::new()) };
}

static ANY_THREAD_HANDLERS: Mutex<Vec<(u64, Handler)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static INSTALL: Once = Once::new();

fn install_dispatcher() {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !dispatch(info) {
                previous(info);
            }
        }));
    });
}

fn dispatch(info: &PanicHookInfo<'_>) -> bool {
    // Copies of the lists: a handler never runs while a list is borrowed.
    let mine: Vec<Handler> = THREAD_HANDLERS
        .try_with(|h| {
            h.borrow()
                .iter()
                .rev()
                .map(|(_, h)| Arc::clone(h))
                .collect()
        })
        .unwrap_or_default();
    if mine.iter().any(|h| h(info)) {
        return true;
    }
    let any: Vec<Handler> = match ANY_THREAD_HANDLERS.lock() {
        Ok(g) => g.iter().map(|(_, h)| Arc::clone(h)).collect(),
        Err(p) => p.into_inner().iter().map(|(_, h)| Arc::clone(h)).collect(),
    };
    // Every registered scope sees the panic (two runs in one process, as in
    // tests, each record it); it is taken if any of them takes it.
    let mut taken = false;
    for h in &any {
        taken |= h(info);
    }
    taken
}

/// Removes its thread handler when dropped (on the thread that registered
/// it: the guard is not `Send`).
#[must_use = "the handler is removed when the guard drops"]
pub(crate) struct ThreadScope {
    id: u64,
    _not_send: PhantomData<*const ()>,
}

/// Registers `handler` for the panics of the calling thread until the
/// returned guard drops.
pub(crate) fn on_this_thread(
    handler: impl Fn(&PanicHookInfo<'_>) -> bool + Send + Sync + 'static,
) -> ThreadScope {
    install_dispatcher();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    THREAD_HANDLERS.with(|h| h.borrow_mut().push((id, Arc::new(handler))));
    ThreadScope {
        id,
        _not_send: PhantomData,
    }
}

impl Drop for ThreadScope {
    fn drop(&mut self) {
        let id = self.id;
        let _ = THREAD_HANDLERS.try_with(|h| h.borrow_mut().retain(|(i, _)| *i != id));
    }
}

/// Removes its handler when dropped.
#[must_use = "the handler is removed when the guard drops"]
pub(crate) struct AnyThreadScope {
    id: u64,
}

/// Registers `handler` for the panics of every thread that no thread
/// handler takes, until the returned guard drops.
pub(crate) fn on_any_thread(
    handler: impl Fn(&PanicHookInfo<'_>) -> bool + Send + Sync + 'static,
) -> AnyThreadScope {
    install_dispatcher();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    match ANY_THREAD_HANDLERS.lock() {
        Ok(mut g) => g.push((id, Arc::new(handler))),
        Err(p) => p.into_inner().push((id, Arc::new(handler))),
    }
    AnyThreadScope { id }
}

impl Drop for AnyThreadScope {
    fn drop(&mut self) {
        let id = self.id;
        match ANY_THREAD_HANDLERS.lock() {
            Ok(mut g) => g.retain(|(i, _)| *i != id),
            Err(p) => p.into_inner().retain(|(i, _)| *i != id),
        }
    }
}

/// A panic's message and location: `message (at file:line:column)`.
pub(crate) fn describe(info: &PanicHookInfo<'_>) -> String {
    let p = info.payload();
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".into());
    match info.location() {
        Some(l) => format!("{msg} (at {}:{}:{})", l.file(), l.line(), l.column()),
        None => msg,
    }
}

/// The panic message of a caught payload (`catch_unwind`, `join`), without
/// a location.
pub(crate) fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".into())
}

/// Panics recorded by handlers, oldest first (at most 64), and whether
/// there was one (cheap to ask, for loops that stop when a run failed).
#[derive(Clone, Default, Debug)]
pub(crate) struct Recorded {
    list: Arc<Mutex<Vec<String>>>,
    any: Arc<AtomicBool>,
}

impl Recorded {
    pub(crate) fn push(&self, m: String) {
        let mut g = match self.list.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.len() < 64 {
            g.push(m);
        }
        self.any.store(true, Ordering::Release);
    }

    pub(crate) fn all(&self) -> Vec<String> {
        match self.list.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether a panic was recorded.
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }
}

thread_local! {
    static CURRENT_RUN: RefCell<Option<Recorded>> = const { RefCell::new(None) };
}

/// Makes `run` the failures of the run the calling (worker) thread belongs
/// to, until the guard drops: [`current_run_failed`] then asks it.
pub(crate) fn enter_run(run: Recorded) -> RunScope {
    let previous = CURRENT_RUN.with(|c| c.borrow_mut().replace(run));
    RunScope {
        previous,
        _not_send: PhantomData,
    }
}

/// Restores the calling thread's previous run when dropped.
#[must_use = "the run is left when the guard drops"]
pub(crate) struct RunScope {
    previous: Option<Recorded>,
    _not_send: PhantomData<*const ()>,
}

impl Drop for RunScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        let _ = CURRENT_RUN.try_with(|c| *c.borrow_mut() = previous);
    }
}

/// Whether a thread of the calling worker's run panicked (another worker,
/// or a communication thread): the worker's loops then stop waiting for
/// progress that will never come.
pub(crate) fn current_run_failed() -> bool {
    CURRENT_RUN
        .try_with(|c| c.borrow().as_ref().is_some_and(Recorded::any))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_handlers_see_only_their_thread_and_end_with_their_scope() {
        let seen = Recorded::default();
        let s = seen.clone();
        let scope = on_this_thread(move |info| {
            s.push(describe(info));
            true
        });
        let r = std::panic::catch_unwind(|| panic!("taken here"));
        assert!(r.is_err());
        // Another thread's panic is not this scope's (it goes to the
        // previous hook: printed, captured by the test harness).
        let other = std::thread::spawn(|| panic!("another thread's panic")).join();
        assert!(other.is_err());
        drop(scope);
        let r = std::panic::catch_unwind(|| panic!("after the scope"));
        assert!(r.is_err());
        let all = seen.all();
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(
            all[0].starts_with("taken here (at ") && all[0].contains("panics.rs:"),
            "{all:?}"
        );
    }

    #[test]
    fn any_thread_handlers_see_threads_without_their_own() {
        let seen = Recorded::default();
        let s = seen.clone();
        let marker = "any-thread-handler-test";
        let scope = on_any_thread(move |info| {
            let text = describe(info);
            let mine = text.contains(marker);
            if mine {
                s.push(text);
            }
            mine
        });
        let h = std::thread::spawn(move || panic!("{marker}: spawned"));
        assert!(h.join().is_err());
        // A thread with its own handler that takes the panic: not seen.
        let h = std::thread::spawn(move || {
            let _own = on_this_thread(|_| true);
            panic!("{marker}: taken by the thread")
        });
        assert!(h.join().is_err());
        drop(scope);
        let all = seen.all();
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].contains("spawned"), "{all:?}");
    }
}
