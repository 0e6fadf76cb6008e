//! How results of the core reach asyncio without any tokio worker taking the GIL.
//!
//! A call from Python ([`spawn`]) runs on the hub's event-loop thread, which
//! holds the GIL. It creates an `asyncio.Future` on the running loop, files it
//! under a fresh id in that loop's [`Dispatcher`], and spawns the Rust future on
//! our tokio runtime. The task holds no Python object. When it ends it pushes
//! `(id, result)` onto the loop's completion queue (plain Rust data: the
//! conversion to Python objects is a closure run later) and writes one byte
//! to a socket pair whose other end the loop watches (`loop.add_reader`).
//! The loop then calls [`Dispatcher::drain`] on its own thread: it reads the
//! bytes, takes the finished results, converts them to Python objects or
//! `SpawnerError`s and sets the futures. So a worker only ever locks a short
//! Rust mutex and writes to a socket; the GIL is taken only by the thread that
//! already runs Python.
//!
//! Cancellation: each future has a done callback; when the future was
//! cancelled (the hub's `start_timeout`, a closed progress stream, `asyncio.run`
//! ending) it aborts the tokio task, which drops the Rust future at its next
//! await, as pyo3-async-runtimes did before (a launch cancelled mid-way stops
//! there; the journal written before the launch covers clean-up).
//!
//! Each event loop has its own dispatcher (kept in a `WeakKeyDictionary` keyed
//! by the loop), so tests that run many loops in one process work. A result
//! that arrives for a loop that is gone, or for a future already cancelled, is
//! dropped.

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::IntoPyObjectExt;
use tokio::runtime::Runtime;

/// What a finished task leaves for the loop thread: builds the Python result.
type Deliver = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

/// The tokio runtime every call of the bridge runs on (built on first use).
static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The runtime, or why it could not be built.
pub(super) fn runtime() -> PyResult<&'static Runtime> {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("ssh-spawner-tokio")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the tokio runtime: {e}")))
}

/// Counters of the bridge, for tests and diagnostics.
static SPAWNED: AtomicU64 = AtomicU64::new(0);
static HANDED_OVER: AtomicU64 = AtomicU64::new(0);
static DELIVERED: AtomicU64 = AtomicU64::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// (calls spawned, results handed over by tokio tasks, results set on
/// asyncio futures). "Handed over" is counted by the task itself once its
/// result is queued and the loop woken: it moves while the loop thread holds
/// the GIL, which is what `tests/e2e/test_bridge.py` checks.
pub(super) fn stats() -> (u64, u64, u64) {
    (
        SPAWNED.load(Ordering::SeqCst),
        HANDED_OVER.load(Ordering::SeqCst),
        DELIVERED.load(Ordering::SeqCst),
    )
}

/// The half of a loop's dispatcher the tokio tasks see: no Python in it.
struct Shared {
    done: Mutex<Vec<(u64, Deliver)>>,
    /// A wake-up byte is on its way and not yet read.
    signalled: AtomicBool,
    /// The loop's dispatcher is gone: drop results.
    closed: AtomicBool,
    writer: UnixStream,
}

impl Shared {
    fn complete(&self, id: u64, deliver: Deliver) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(mut q) = self.done.lock() {
            q.push((id, deliver));
        }
        if !self.signalled.swap(true, Ordering::SeqCst) {
            // Non-blocking. A full buffer means wake-ups are already unread;
            // a closed peer (loop gone) means nobody is waiting.
            let _ = (&self.writer).write(&[1]);
        }
        HANDED_OVER.fetch_add(1, Ordering::SeqCst);
    }
}

/// Ends a task's life on the bridge: the task sends its result, or (aborted
/// or panicked) the drop sends an error the loop ignores for a cancelled
/// future.
struct Completion {
    shared: Arc<Shared>,
    id: u64,
    sent: bool,
}

impl Completion {
    fn send(mut self, deliver: Deliver) {
        self.sent = true;
        self.shared.complete(self.id, deliver);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.sent {
            self.shared.complete(
                self.id,
                Box::new(|_py| {
                    Err(PyRuntimeError::new_err(
                        "ssh-spawner core: the task for this call ended without a result",
                    ))
                }),
            );
        }
    }
}

type Pending = Mutex<HashMap<u64, Py<PyAny>>>;

/// One event loop's end of the bridge: its futures by id and the socket it watches.
#[pyclass(frozen)]
pub(super) struct Dispatcher {
    shared: Arc<Shared>,
    reader: UnixStream,
    /// Futures not yet set; touched only on the loop thread.
    pending: Arc<Pending>,
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
    }
}

#[pymethods]
impl Dispatcher {
    /// Called by the loop when the socket is readable: set the futures of
    /// every finished task.
    fn drain(&self, py: Python<'_>) {
        // Read the wake-up bytes first, then clear the flag, then take the
        // queue. In that order a result queued after the take always has a
        // byte unread behind it: its own, or that of the completion which
        // set the flag after the clear, which this drain has not read.
        // Clearing the flag first (as before) let this drain read that
        // byte, take only the earlier result, and leave the flag set with
        // no byte pending: every later result then waited forever (a hub's
        // spawn hung with its server running).
        let mut buf = [0u8; 256];
        while let Ok(n) = (&self.reader).read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        self.shared.signalled.store(false, Ordering::SeqCst);
        let done = match self.shared.done.lock() {
            Ok(mut q) => std::mem::take(&mut *q),
            Err(_) => return,
        };
        for (id, deliver) in done {
            let fut = self.pending.lock().ok().and_then(|mut p| p.remove(&id));
            let Some(fut) = fut else { continue };
            let fut = fut.bind(py);
            if fut
                .call_method0("done")
                .and_then(|d| d.is_truthy())
                .unwrap_or(true)
            {
                continue;
            }
            let set = match deliver(py) {
                Ok(value) => fut.call_method1("set_result", (value,)),
                Err(err) => fut.call_method1("set_exception", (err.into_value(py),)),
            };
            match set {
                Ok(_) => {
                    DELIVERED.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => e.write_unraisable(py, Some(fut)),
            }
        }
    }
}

/// The done callback of each future: a cancelled future aborts its task.
#[pyclass(frozen)]
struct OnDone {
    id: u64,
    abort: tokio::task::AbortHandle,
    pending: Weak<Pending>,
}

#[pymethods]
impl OnDone {
    fn __call__(&self, fut: &Bound<'_, PyAny>) {
        if fut
            .call_method0("cancelled")
            .and_then(|c| c.is_truthy())
            .unwrap_or(false)
        {
            self.abort.abort();
        }
        if let Some(pending) = self.pending.upgrade() {
            let gone = pending.lock().ok().and_then(|mut p| p.remove(&self.id));
            drop(gone);
        }
    }
}

/// Loop -> dispatcher, weakly keyed by the loop.
static DISPATCHERS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
/// The same for loops that cannot be weakly referenced.
static STRONG: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn dispatcher_for<'py>(
    py: Python<'py>,
    event_loop: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, Dispatcher>> {
    let table = DISPATCHERS
        .get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            Ok(py
                .import("weakref")?
                .getattr("WeakKeyDictionary")?
                .call0()?
                .unbind())
        })?
        .bind(py);
    let strong = STRONG
        .get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            Ok(pyo3::types::PyDict::new(py).into_any().unbind())
        })?
        .bind(py);
    for t in [table, strong] {
        let found = t.call_method1("get", (event_loop,))?;
        if let Ok(d) = found.cast::<Dispatcher>() {
            return Ok(d.clone());
        }
    }
    let (reader, writer) = UnixStream::pair()
        .and_then(|(r, w)| {
            r.set_nonblocking(true)?;
            w.set_nonblocking(true)?;
            Ok((r, w))
        })
        .map_err(|e| {
            PyRuntimeError::new_err(format!("ssh-spawner: cannot make a socket pair: {e}"))
        })?;
    let fd = reader.as_raw_fd();
    let d = Bound::new(
        py,
        Dispatcher {
            shared: Arc::new(Shared {
                done: Mutex::new(Vec::new()),
                signalled: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                writer,
            }),
            reader,
            pending: Arc::new(Mutex::new(HashMap::new())),
        },
    )?;
    event_loop.call_method1("add_reader", (fd, d.getattr("drain")?))?;
    // A loop that takes no weak reference (none of asyncio's) is kept for good.
    if table.set_item(event_loop, &d).is_err() {
        strong.set_item(event_loop, &d)?;
    }
    Ok(d)
}

/// Run `fut` on the tokio runtime; returns an `asyncio.Future` of the
/// running loop that gets its result (converted on the loop thread).
pub(super) fn spawn<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, super::Failure>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let event_loop = py
        .import("asyncio")?
        .call_method0("get_running_loop")
        .map_err(|_| {
            PyRuntimeError::new_err("ssh-spawner core: call this from a running asyncio event loop")
        })?;
    let rt = runtime()?;
    let dispatcher = dispatcher_for(py, &event_loop)?;
    let py_fut = event_loop.call_method0("create_future")?;
    let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
    let d = dispatcher.get();
    d.pending
        .lock()
        .map_err(|_| PyRuntimeError::new_err("ssh-spawner bridge: poisoned lock"))?
        .insert(id, py_fut.clone().unbind());
    let completion = Completion {
        shared: d.shared.clone(),
        id,
        sent: false,
    };
    let handle = rt.spawn(async move {
        let result = fut.await;
        completion.send(Box::new(move |py| match result {
            Ok(value) => value.into_py_any(py),
            Err(failure) => Err(failure.into_pyerr(py)),
        }));
    });
    SPAWNED.fetch_add(1, Ordering::SeqCst);
    let on_done = OnDone {
        id,
        abort: handle.abort_handle(),
        pending: Arc::downgrade(&d.pending),
    };
    py_fut.call_method1("add_done_callback", (on_done,))?;
    Ok(py_fut)
}
