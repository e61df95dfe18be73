/* balancer._sockio: recv, send, send_span, accept and peek on non-blocking sockets without
 * releasing the GIL (the seam that picks these or their Python equivalents is
 * balancer/sockcalls.py; docs/ARCHITECTURE.md, "The socket calls").
 *
 * The socket module's recv, send and _accept release and re-take the GIL
 * around every syscall, parse their arguments from a tuple, and recv
 * allocates a bytes object of the size asked for and shrinks it after; an
 * accepted descriptor then costs a socket object and an ioctl to make it
 * non-blocking (accept4 here makes it non-blocking at once).  A worker's data plane
 * runs in one thread and calls these on non-blocking sockets only (every
 * call passes MSG_DONTWAIT: none can block, whatever the socket's mode), so
 * holding the GIL across the syscall costs nobody anything.
 *
 * send_span sends a response's head and its body in one sendmsg, the body as
 * it lies in the bytes object it was read into ((data, start): the body after
 * the backend's own head; balancer/spans.py): neither is sliced out or
 * joined to the other in user space (docs/ARCHITECTURE.md, "Hot path notes").
 *
 * All take the socket object (a _socket.socket, or a subclass: gevent's
 * `_sock`), never a file descriptor: its descriptor is read from the object
 * at every call, so a closed socket (descriptor -1) fails with EBADF as the
 * socket module's calls do, and never reaches a descriptor number reused
 * by another connection.  The object's layout is CPython's private
 * PySocketSockObject, whose first field is the descriptor; the module
 * checks that on a real socket when it is imported and refuses to import
 * (ImportError: the seam uses the Python calls) if it does not hold.
 *
 * Errors are those of the socket module: OSError built from errno
 * (PyErr_SetFromErrno picks ConnectionResetError, BrokenPipeError, ...), a
 * syscall interrupted by a signal runs the Python signal handlers (their
 * exception propagates) and is retried.  Two outcomes differ on purpose:
 * EAGAIN is not raised (recv and accept return None, send and send_span 0), which
 * saves the callers an exception per empty read or accept queue; peek raises
 * no OSError at all (a failure is the socket's end: -1); and send and
 * send_span pass MSG_NOSIGNAL (Python ignores SIGPIPE anyway: either way a
 * closed peer is EPIPE, BrokenPipeError).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* The head of CPython's PySocketSockObject (Modules/socketmodule.h). */
typedef struct {
    PyObject_HEAD
    int sock_fd;
} SocketHead;

/* recv's buffer for sizes up to its own: read into it, then copy exactly the
 * bytes read into a bytes object.  One buffer serves every call: the GIL is
 * held from the syscall until the copy, so no other call can run between. */
#define BUFFER_SIZE 65536
static char buffer[BUFFER_SIZE];

static PyTypeObject *socket_type;  /* _socket.socket */

static int
fd_of(PyObject *sock)
{
    if (!PyObject_TypeCheck(sock, socket_type)) {
        PyErr_Format(PyExc_TypeError, "expected a _socket.socket, not %.200s",
                     Py_TYPE(sock)->tp_name);
        return -2;
    }
    return ((SocketHead *)sock)->sock_fd;
}

/* The descriptor of name()'s first argument, checking it and that two were
 * given; -2 with the exception set. */
static int
fd_arg(const char *name, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly 2 arguments (%zd given)", name, nargs);
        return -2;
    }
    return fd_of(args[0]);
}

/* A syscall failed with errno: 1 to retry (EINTR, no handler raised), 0 for
 * EAGAIN, -1 with the exception set. */
static int
failed(void)
{
    int err = errno;
    if (err == EINTR) {
        return PyErr_CheckSignals() < 0 ? -1 : 1;
    }
    if (err == EAGAIN || err == EWOULDBLOCK) {
        return 0;
    }
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

static PyObject *
recv_large(int fd, Py_ssize_t size)
{
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, size);
    if (bytes == NULL) {
        return NULL;
    }
    for (;;) {
        ssize_t got = recv(fd, PyBytes_AS_STRING(bytes), (size_t)size, MSG_DONTWAIT);
        if (got >= 0) {
            if (got != size && _PyBytes_Resize(&bytes, got) < 0) {
                return NULL;
            }
            return bytes;
        }
        int verdict = failed();
        if (verdict != 1) {
            Py_DECREF(bytes);
            return verdict == 0 ? Py_NewRef(Py_None) : NULL;
        }
    }
}

PyDoc_STRVAR(recv_doc,
"recv(sock, size, /)\n--\n\n"
"Up to size bytes from the non-blocking socket sock (b\"\" at EOF), or None if\n"
"none can be read now. Raises OSError as sock.recv does.");

static PyObject *
sockio_recv(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd = fd_arg("recv", args, nargs);
    if (fd == -2) {
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative buffersize in recv");
        return NULL;
    }
    if (size > BUFFER_SIZE) {
        return recv_large(fd, size);
    }
    for (;;) {
        ssize_t got = recv(fd, buffer, (size_t)size, MSG_DONTWAIT);
        if (got >= 0) {
            return PyBytes_FromStringAndSize(buffer, got);
        }
        int verdict = failed();
        if (verdict != 1) {
            return verdict == 0 ? Py_NewRef(Py_None) : NULL;
        }
    }
}

PyDoc_STRVAR(send_doc,
"send(sock, data, /)\n--\n\n"
"Send what the non-blocking socket sock takes of data (any bytes-like object)\n"
"now; returns how many bytes, 0 if its buffer is full. Raises OSError as\n"
"sock.send does.");

static PyObject *
sockio_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd = fd_arg("send", args, nargs);
    if (fd == -2) {
        return NULL;
    }
    PyObject *data = args[1];
    Py_buffer view;
    int is_bytes = PyBytes_CheckExact(data);
    if (is_bytes) {
        view.buf = PyBytes_AS_STRING(data);
        view.len = PyBytes_GET_SIZE(data);
    }
    else if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    ssize_t sent;
    for (;;) {
        sent = send(fd, view.buf, (size_t)view.len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent >= 0) {
            break;
        }
        int verdict = failed();
        if (verdict == 0) {
            sent = 0;
            break;
        }
        if (verdict < 0) {
            if (!is_bytes) {
                PyBuffer_Release(&view);
            }
            return NULL;
        }
    }
    if (!is_bytes) {
        PyBuffer_Release(&view);
    }
    return PyLong_FromSsize_t(sent);
}

PyDoc_STRVAR(send_span_doc,
"send_span(sock, head, span, /)\n--\n\n"
"Send what the non-blocking socket sock takes now of head (bytes) followed by\n"
"data[start:] of span, a (data, start) tuple of bytes and int, in one sendmsg\n"
"and without copying either; returns how many bytes, 0 if its buffer is full.\n"
"Raises OSError as sock.sendmsg does, ValueError if start is not within data.");

static PyObject *
sockio_send_span(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "send_span() takes exactly 3 arguments (%zd given)", nargs);
        return NULL;
    }
    int fd = fd_of(args[0]);
    if (fd == -2) {
        return NULL;
    }
    PyObject *head = args[1], *span = args[2];
    if (!PyBytes_Check(head)) {
        PyErr_Format(PyExc_TypeError, "send_span() head must be bytes, not %.200s",
                     Py_TYPE(head)->tp_name);
        return NULL;
    }
    if (!PyTuple_Check(span) || PyTuple_GET_SIZE(span) != 2
            || !PyBytes_Check(PyTuple_GET_ITEM(span, 0))) {
        PyErr_SetString(PyExc_TypeError, "send_span() span must be a (bytes, start) tuple");
        return NULL;
    }
    PyObject *data = PyTuple_GET_ITEM(span, 0);
    Py_ssize_t start = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 1));
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (start < 0 || start > PyBytes_GET_SIZE(data)) {
        PyErr_SetString(PyExc_ValueError, "send_span() start out of its bytes");
        return NULL;
    }
    struct iovec iov[2];
    iov[0].iov_base = PyBytes_AS_STRING(head);
    iov[0].iov_len = (size_t)PyBytes_GET_SIZE(head);
    iov[1].iov_base = PyBytes_AS_STRING(data) + start;
    iov[1].iov_len = (size_t)(PyBytes_GET_SIZE(data) - start);
    struct msghdr message = {0};
    message.msg_iov = iov;
    message.msg_iovlen = 2;
    for (;;) {
        ssize_t sent = sendmsg(fd, &message, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent >= 0) {
            return PyLong_FromSsize_t(sent);
        }
        int verdict = failed();
        if (verdict != 1) {
            return verdict == 0 ? PyLong_FromLong(0) : NULL;
        }
    }
}

/* The peer's address as the socket module gives it: (host, port) for IPv4,
 * (host, port, flowinfo, scope_id) for IPv6; any other family through the
 * socket object's own getpeername(). */
static PyObject *
address_of(PyObject *sock, const struct sockaddr_storage *addr)
{
    char host[INET6_ADDRSTRLEN];
    if (addr->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        if (inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host)) == NULL) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        return Py_BuildValue("(si)", host, (int)ntohs(in->sin_port));
    }
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
        if (inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host)) == NULL) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        return Py_BuildValue("(siII)", host, (int)ntohs(in6->sin6_port),
                             (unsigned int)ntohl(in6->sin6_flowinfo),
                             (unsigned int)in6->sin6_scope_id);
    }
    return PyObject_CallMethod(sock, "getpeername", NULL);
}

PyDoc_STRVAR(accept_doc,
"accept(listener, proto, /)\n--\n\n"
"The next connection waiting on the listening socket listener, as (socket,\n"
"address), the socket non-blocking (as listener._accept() then\n"
"socket.socket(family, SOCK_STREAM, proto, fd).setblocking(False) make it, with\n"
"one syscall instead of two); None if none waits now. Raises OSError as\n"
"listener._accept() does.");

static PyObject *
sockio_accept(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int listener = fd_arg("accept", args, nargs);
    if (listener == -2) {
        return NULL;
    }
    long proto = PyLong_AsLong(args[1]);
    if (proto == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (proto < INT_MIN || proto > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "proto out of range");
        return NULL;
    }
    struct sockaddr_storage addr;
    int fd;
    for (;;) {
        socklen_t length = sizeof(addr);
        fd = accept4(listener, (struct sockaddr *)&addr, &length, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            break;
        }
        int verdict = failed();
        if (verdict != 1) {
            return verdict == 0 ? Py_NewRef(Py_None) : NULL;
        }
    }
    /* SOCK_NONBLOCK in the type: the socket module sets a timeout of 0 with no
     * syscall (the descriptor is non-blocking already) */
    PyObject *sock = PyObject_CallFunction((PyObject *)socket_type, "iiii", (int)addr.ss_family,
                                           SOCK_STREAM | SOCK_NONBLOCK, (int)proto, fd);
    if (sock == NULL) {
        close(fd);
        return NULL;
    }
    PyObject *address = address_of(sock, &addr);
    if (address == NULL) {
        Py_DECREF(sock);  /* closes the descriptor */
        return NULL;
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(sock);
        Py_DECREF(address);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, sock);
    PyTuple_SET_ITEM(pair, 1, address);
    return pair;
}

PyDoc_STRVAR(peek_doc,
"peek(sock, /)\n--\n\n"
"What waits on the socket sock's read side now, looked at without reading or\n"
"waiting (recv of one byte, MSG_PEEK | MSG_DONTWAIT): 0 nothing (open), 1 bytes,\n"
"-1 its end or an error (EOF, a reset, a closed socket). Never raises OSError.");

static PyObject *
sockio_peek(PyObject *module, PyObject *sock)
{
    int fd = fd_of(sock);
    if (fd == -2) {
        return NULL;
    }
    char byte;
    for (;;) {
        ssize_t got = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
        if (got >= 0) {
            return PyLong_FromLong(got > 0 ? 1 : -1);  /* (small ints: cached, no allocation) */
        }
        int err = errno;
        if (err != EINTR) {
            return PyLong_FromLong(err == EAGAIN || err == EWOULDBLOCK ? 0 : -1);
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
}

static PyMethodDef methods[] = {
    {"recv", (PyCFunction)(void (*)(void))sockio_recv, METH_FASTCALL, recv_doc},
    {"send", (PyCFunction)(void (*)(void))sockio_send, METH_FASTCALL, send_doc},
    {"send_span", (PyCFunction)(void (*)(void))sockio_send_span, METH_FASTCALL, send_span_doc},
    {"accept", (PyCFunction)(void (*)(void))sockio_accept, METH_FASTCALL, accept_doc},
    {"peek", (PyCFunction)sockio_peek, METH_O, peek_doc},
    {NULL, NULL, 0, NULL},
};

/* Whether a real socket's head holds its fileno(), and -1 once it is closed
 * (1: it does, 0: it does not, -1: an exception is set). */
static int
layout_holds(void)
{
    PyObject *sock = PyObject_CallFunction((PyObject *)socket_type, "ii", AF_UNIX, SOCK_STREAM);
    if (sock == NULL) {
        return -1;
    }
    int holds = -1;
    PyObject *fileno = PyObject_CallMethod(sock, "fileno", NULL);
    if (fileno != NULL) {
        long expected = PyLong_AsLong(fileno);
        Py_DECREF(fileno);
        if (!(expected == -1 && PyErr_Occurred())) {
            holds = expected >= 0 && ((SocketHead *)sock)->sock_fd == expected;
        }
    }
    PyObject *closed = PyObject_CallMethod(sock, "close", NULL);
    if (closed == NULL) {
        holds = -1;
    }
    else {
        Py_DECREF(closed);
        holds = holds == 1 && ((SocketHead *)sock)->sock_fd == -1 ? 1 : holds;
    }
    Py_DECREF(sock);
    return holds;
}

static int
sockio_exec(PyObject *module)
{
    PyObject *socket_module = PyImport_ImportModule("_socket");
    if (socket_module == NULL) {
        return -1;
    }
    PyObject *type = PyObject_GetAttrString(socket_module, "socket");
    Py_DECREF(socket_module);
    if (type == NULL) {
        return -1;
    }
    if (!PyType_Check(type)) {
        Py_DECREF(type);
        PyErr_SetString(PyExc_ImportError, "_socket.socket is not a type");
        return -1;
    }
    socket_type = (PyTypeObject *)type;  /* kept for the process's life */
    int holds = layout_holds();
    if (holds < 0) {  /* no socket to check with: as good as a wrong layout */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyErr_NormalizeException(&type, &value, &traceback);
        PyErr_Format(PyExc_ImportError, "balancer._sockio could not check _socket.socket's "
                     "layout: %S", value);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return -1;
    }
    if (!holds) {
        PyErr_SetString(PyExc_ImportError,
                        "_socket.socket's layout is not the one balancer._sockio reads");
        return -1;
    }
    return PyModule_AddIntConstant(module, "BUFFER_SIZE", BUFFER_SIZE);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, sockio_exec},
    {0, NULL},
};

static struct PyModuleDef sockio_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "balancer._sockio",
    .m_doc = "recv, send, send_span, accept and peek on non-blocking sockets without releasing the GIL "
             "(balancer.sockcalls picks them)",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__sockio(void)
{
    return PyModuleDef_Init(&sockio_module);
}
