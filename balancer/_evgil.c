/* balancer._evgil: gevent's libev loop runs its callbacks one GIL hold per batch
 * (balancer/evgil.py installs it; docs/ARCHITECTURE.md, "Hot path notes").
 *
 * gevent runs libev with the GIL released (``with nogil: ev_run(...)``) and
 * each of its C callbacks takes the GIL and drops it again around the Python
 * it calls (PyGILState_Ensure, PyGILState_Release): two mutexes, a condition
 * variable and the thread-state swap, ~500 instructions per callback, every
 * readiness of every socket.  libev calls one function to run the callbacks
 * that are pending (its ``invoke_pending_cb``, ev_invoke_pending by default):
 * after each poll, and in the prepare phase, where gevent runs its own queued
 * callbacks.  `hold_gil` sets that function, on one loop, to one that takes
 * the GIL, runs them all (ev_invoke_pending), and drops it: gevent's callbacks
 * then find the GIL held by their thread, and their PyGILState_Ensure and
 * Release only count (no lock).  The GIL is still dropped for every poll, so
 * other threads (gevent's thread pool) run while the loop waits, and between
 * batches.
 *
 * The loop is gevent's libev loop object's `ptr` (the address of its struct
 * ev_loop); ev_set_invoke_pending_cb, ev_invoke_pending and ev_pending_count are
 * looked up in gevent's own extension (the module file given, already loaded:
 * RTLD_NOLOAD), which links libev in and exports its API.  Nothing else of
 * gevent is touched: no field of its objects is read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>

typedef void (*invoke_fn)(void *loop);
typedef void (*set_invoke_fn)(void *loop, invoke_fn invoke);
typedef unsigned int (*count_fn)(void *loop);

static invoke_fn invoke_pending;  /* libev's ev_invoke_pending */
static count_fn pending_count;    /* libev's ev_pending_count */

/* What the hooked loops ran, process-wide, since the start (a forked child starts
 * from its parent's counts; `counts`): batches run in one hold of the GIL, the
 * callbacks pending when each began (those its callbacks fed meanwhile run in it
 * too, uncounted), and lone callbacks, which took the GIL themselves.  `holds` and
 * `held` change only while the GIL is held; `alone` without it (relaxed atomic: a
 * hooked loop in another thread may count at the same time). */
static unsigned long long holds, held, alone;

/* libev's invoke_pending_cb: the pending callbacks, in one hold of the GIL when
 * there are two or more (one takes it itself, as it would have: holding it
 * around a lone callback too cost ~100 instructions more than the callback's
 * own take saves).  Called by ev_run, where gevent has released the GIL;
 * PyGILState_Ensure takes it in any case, and Release gives it back only if it
 * was not held. */
static void
invoke_holding_gil(void *loop)
{
    unsigned int pending = pending_count(loop);
    if (pending < 2) {
        if (pending) {
            __atomic_add_fetch(&alone, 1, __ATOMIC_RELAXED);
        }
        invoke_pending(loop);
        return;
    }
    PyGILState_STATE state = PyGILState_Ensure();
    holds += 1;
    held += pending;
    invoke_pending(loop);
    PyGILState_Release(state);
}

/* hold_gil(library, loop): set the loop's invoke_pending_cb; whether it was set
 * (False: `library` is not loaded or does not export libev's calls). */
static PyObject *
hold_gil(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "hold_gil() takes exactly 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *path = PyUnicode_EncodeFSDefault(args[0]);
    if (path == NULL) {
        return NULL;
    }
    void *loop = PyLong_AsVoidPtr(args[1]);
    if (loop == NULL) {
        Py_DECREF(path);
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "hold_gil() of a null loop");
        }
        return NULL;
    }
    void *library = dlopen(PyBytes_AS_STRING(path), RTLD_NOW | RTLD_NOLOAD);
    Py_DECREF(path);
    if (library == NULL) {
        Py_RETURN_FALSE;
    }
    set_invoke_fn set_invoke = (set_invoke_fn)dlsym(library, "ev_set_invoke_pending_cb");
    invoke_fn invoke = (invoke_fn)dlsym(library, "ev_invoke_pending");
    count_fn count = (count_fn)dlsym(library, "ev_pending_count");
    /* the handle is not closed: gevent's module stays loaded for the process's life,
     * and the loop calls into it through these */
    if (set_invoke == NULL || invoke == NULL || count == NULL) {
        Py_RETURN_FALSE;
    }
    if ((invoke_pending != NULL && invoke_pending != invoke)
            || (pending_count != NULL && pending_count != count)) {
        PyErr_SetString(PyExc_RuntimeError, "hold_gil() given another libev");
        return NULL;
    }
    invoke_pending = invoke;
    pending_count = count;
    set_invoke(loop, invoke_holding_gil);
    Py_RETURN_TRUE;
}

/* counts(): (holds, held, alone), see above. */
static PyObject *
counts(PyObject *module, PyObject *unused)
{
    return Py_BuildValue("(KKK)", holds, held, __atomic_load_n(&alone, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"hold_gil", (PyCFunction)(void (*)(void))hold_gil, METH_FASTCALL,
     "hold_gil(library, loop): the libev loop at address `loop` (in gevent's extension "
     "module file `library`) runs its pending callbacks in one hold of the GIL; whether "
     "it was set up."},
    {"counts", counts, METH_NOARGS,
     "counts(): (batches run in one hold of the GIL, callbacks pending when they began, "
     "lone callbacks that took the GIL themselves), process-wide since the start."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef evgil_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "balancer._evgil",
    .m_doc = "gevent's libev loop runs its pending callbacks in one hold of the GIL "
             "(balancer.evgil installs it)",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__evgil(void)
{
    return PyModuleDef_Init(&evgil_module);
}
