/* The L2 order book of services/collector/book.py, compiled.
 *
 * Same interface and same results as the pure-Python OrderBook (the reference, and the
 * fallback where this extension is not built) for books that do not keep the exchange's
 * strings; tests/test_collector_book.py checks the two agree on random update sequences.
 *
 * Each side is one array of (key, size) sorted by key = sign * price, descending, so the
 * best level is the LAST element: the changes a diff feed carries are mostly near the touch
 * (median ~90 levels from it on Binance BTCUSDT), and an insert or delete only moves the
 * levels between it and the touch. Reading the top n levels is a walk back from the end.
 * A side never holds two levels at one price, and never a level of size 0.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double key;
    double size;
    PyObject *pair; /* the (price, size) tuple top() hands out, or NULL until one is needed */
} Level;

typedef struct {
    PyObject_HEAD
    Level *levels;
    Py_ssize_t n;
    Py_ssize_t cap;
    int sign; /* -1 for bids (keys ascend best first), +1 for asks */
} SideObject;

typedef struct {
    PyObject_HEAD
    SideObject *bids;
    SideObject *asks;
    Py_ssize_t max_levels;
} BookObject;

static PyTypeObject SideType;
static PyTypeObject BookType;

/* ------------------------------------------------------------------ side internals
 *
 * Each level keeps the (price, size) tuple it was given when that is an exact tuple of two
 * exact floats (what msgspec decodes and exchange modules build), or the one top() made for
 * it: a snapshot of the top 20 then allocates two lists and nothing else. Tuples and floats
 * are immutable, so sharing them between snapshots changes nothing a reader can see. */

static int
side_reserve(SideObject *self, Py_ssize_t need)
{
    if (need <= self->cap)
        return 0;
    Py_ssize_t cap = self->cap ? self->cap : 64;
    while (cap < need)
        cap *= 2;
    Level *grown = PyMem_Realloc(self->levels, (size_t)cap * sizeof(Level));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->levels = grown;
    self->cap = cap;
    return 0;
}

static void
side_clear(SideObject *self)
{
    for (Py_ssize_t k = 0; k < self->n; k++)
        Py_CLEAR(self->levels[k].pair);
    self->n = 0;
}

/* First index whose key is <= key (keys descend), n if none. Most changes are near the touch,
 * at the end: gallop back from it (1, 2, 4, ... levels) before the binary search. */
static Py_ssize_t
side_find(const SideObject *self, double key)
{
    const Level *lv = self->levels;
    Py_ssize_t n = self->n, lo = 0, hi = n;
    for (Py_ssize_t step = 1;; step <<= 1) {
        Py_ssize_t probe = n - step;
        if (probe < 0)
            break;
        if (lv[probe].key > key) {
            lo = probe + 1;
            break;
        }
        hi = probe;
    }
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (lv[mid].key > key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Absolute size at price; 0 removes the level (removing a missing level is normal).
 * ``pair`` (borrowed, may be NULL) is the level as given, kept for top(). */
static int
side_set(SideObject *self, double price, double size, PyObject *pair)
{
    if (isnan(price)) {
        PyErr_SetString(PyExc_ValueError, "price is NaN");
        return -1;
    }
    double key = self->sign * price;
    Py_ssize_t i = side_find(self, key);
    Level *lv = self->levels;
    int found = i < self->n && lv[i].key == key;
    if (size == 0.0) {
        if (found) {
            Py_CLEAR(lv[i].pair);
            memmove(lv + i, lv + i + 1, (size_t)(self->n - i - 1) * sizeof(Level));
            self->n--;
        }
        return 0;
    }
    if (found) {
        lv[i].size = size;
        Py_XINCREF(pair);
        Py_XSETREF(lv[i].pair, pair);
        return 0;
    }
    if (side_reserve(self, self->n + 1) < 0)
        return -1;
    lv = self->levels;
    memmove(lv + i + 1, lv + i, (size_t)(self->n - i) * sizeof(Level));
    lv[i].key = key;
    lv[i].size = size;
    Py_XINCREF(pair);
    lv[i].pair = pair;
    self->n++;
    return 0;
}

/* ``(price, size)`` of one level as the exchange module hands it (a 2-tuple or 2-sequence);
 * ``*pair`` is the item itself (borrowed) when it can be handed out as it is, else NULL. */
static int
read_level(PyObject *item, double *price, double *size, PyObject **pair)
{
    PyObject *p, *s;
    *pair = NULL;
    if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) == 2) {
        p = PyTuple_GET_ITEM(item, 0);
        s = PyTuple_GET_ITEM(item, 1);
        if (PyFloat_CheckExact(p) && PyFloat_CheckExact(s)) {
            *price = PyFloat_AS_DOUBLE(p);
            *size = PyFloat_AS_DOUBLE(s);
            *pair = item;
            return 0;
        }
    }
    else if (PyList_CheckExact(item) && PyList_GET_SIZE(item) == 2) {
        p = PyList_GET_ITEM(item, 0);
        s = PyList_GET_ITEM(item, 1);
    }
    else {
        PyObject *seq = PySequence_Fast(item, "a level must be a (price, size) pair");
        if (seq == NULL)
            return -1;
        if (PySequence_Fast_GET_SIZE(seq) != 2) {
            PyErr_SetString(PyExc_ValueError, "a level must be a (price, size) pair");
            Py_DECREF(seq);
            return -1;
        }
        *price = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, 0));
        *size = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, 1));
        Py_DECREF(seq);
        return PyErr_Occurred() ? -1 : 0;
    }
    *price = PyFloat_AsDouble(p);
    if (*price == -1.0 && PyErr_Occurred())
        return -1;
    *size = PyFloat_AsDouble(s);
    if (*size == -1.0 && PyErr_Occurred())
        return -1;
    return 0;
}

static int
side_update(SideObject *self, PyObject *levels)
{
    PyObject *seq = PySequence_Fast(levels, "levels must be iterable");
    if (seq == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t k = 0; k < count; k++) {
        double price, size;
        PyObject *pair;
        if (read_level(items[k], &price, &size, &pair) < 0 || side_set(self, price, size, pair) < 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

/* Replace the side wholesale: one sort instead of many inserts; a later level at a price
 * already given wins, as a dict would have it. */
static int
side_load(SideObject *self, PyObject *levels)
{
    PyObject *seq = PySequence_Fast(levels, "levels must be iterable");
    if (seq == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    side_clear(self);
    if (side_reserve(self, count) < 0) {
        Py_DECREF(seq);
        return -1;
    }
    /* Read into the side's own memory with borrowed pairs; self->n stays 0 until they are owned. */
    Level *lv = self->levels;
    Py_ssize_t n = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        double price, size;
        PyObject *pair;
        if (read_level(items[k], &price, &size, &pair) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        if (isnan(price)) {
            PyErr_SetString(PyExc_ValueError, "price is NaN");
            Py_DECREF(seq);
            return -1;
        }
        if (size == 0.0)
            continue; /* a snapshot's zero size is no level (it removes nothing given before it) */
        lv[n].key = self->sign * price;
        lv[n].size = size;
        lv[n].pair = pair;
        n++;
    }
    /* Exchanges send snapshots best first (keys ascending): reversed, they are already in order. */
    int sorted = 1;
    for (Py_ssize_t k = 1; k < n && sorted; k++) {
        if (!(lv[k].key > lv[k - 1].key))
            sorted = 0;
    }
    if (sorted) {
        for (Py_ssize_t a = 0, b = n - 1; a < b; a++, b--) {
            Level t = lv[a];
            lv[a] = lv[b];
            lv[b] = t;
        }
        for (Py_ssize_t k = 0; k < n; k++)
            Py_XINCREF(lv[k].pair);
        self->n = n;
        Py_DECREF(seq);
        return 0;
    }
    /* The general case, as a dict load: apply in order onto an empty side. */
    Level *given = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Level));
    if (given == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(given, lv, (size_t)n * sizeof(Level));
    int failed = 0;
    for (Py_ssize_t k = 0; k < n && !failed; k++)
        failed = side_set(self, self->sign * given[k].key, given[k].size, given[k].pair) < 0;
    PyMem_Free(given);
    Py_DECREF(seq);
    return failed ? -1 : 0;
}

static void
side_trim(SideObject *self, Py_ssize_t max_levels)
{
    if (max_levels < 0)
        max_levels = 0;
    if (self->n <= max_levels)
        return;
    Py_ssize_t drop = self->n - max_levels; /* the worst levels are at the front */
    for (Py_ssize_t k = 0; k < drop; k++)
        Py_CLEAR(self->levels[k].pair);
    memmove(self->levels, self->levels + drop, (size_t)max_levels * sizeof(Level));
    self->n = max_levels;
}

static PyObject *
side_top(SideObject *self, Py_ssize_t n)
{
    if (n < 0)
        n = 0;
    if (n > self->n)
        n = self->n;
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    Level *lv = self->levels + self->n - 1;
    double sign = self->sign;
    for (Py_ssize_t k = 0; k < n; k++, lv--) {
        if (lv->pair == NULL) {
            PyObject *price = PyFloat_FromDouble(sign * lv->key);
            PyObject *size = PyFloat_FromDouble(lv->size);
            lv->pair = (price && size) ? PyTuple_Pack(2, price, size) : NULL;
            Py_XDECREF(price);
            Py_XDECREF(size);
            if (lv->pair == NULL) {
                Py_DECREF(out);
                return NULL;
            }
        }
        Py_INCREF(lv->pair);
        PyList_SET_ITEM(out, k, lv->pair);
    }
    return out;
}

static PyObject *
side_best(SideObject *self)
{
    if (self->n == 0)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(self->sign * self->levels[self->n - 1].key);
}

static SideObject *
side_new(int sign)
{
    SideObject *self = PyObject_New(SideObject, &SideType);
    if (self == NULL)
        return NULL;
    self->levels = NULL;
    self->n = self->cap = 0;
    self->sign = sign;
    return self;
}

/* ------------------------------------------------------------------ BookSide */

static PyObject *
Side_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"sign", "keep_strings", NULL};
    int sign, keep = 0;
    (void)type; /* not subclassable */
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i|p", kw, &sign, &keep))
        return NULL;
    if (sign != 1 && sign != -1) {
        PyErr_SetString(PyExc_ValueError, "sign must be 1 (asks) or -1 (bids)");
        return NULL;
    }
    if (keep) {
        PyErr_SetString(PyExc_ValueError, "the compiled book does not keep the original strings");
        return NULL;
    }
    return (PyObject *)side_new(sign);
}

static void
Side_dealloc(SideObject *self)
{
    side_clear(self);
    PyMem_Free(self->levels);
    PyObject_Free(self);
}

static Py_ssize_t
Side_len(SideObject *self)
{
    return self->n;
}

static PyObject *
Side_set(SideObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set(price, size)");
        return NULL;
    }
    double price = PyFloat_AsDouble(args[0]);
    if (price == -1.0 && PyErr_Occurred())
        return NULL;
    double size = PyFloat_AsDouble(args[1]);
    if (size == -1.0 && PyErr_Occurred())
        return NULL;
    if (side_set(self, price, size, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Side_update(SideObject *self, PyObject *levels)
{
    if (side_update(self, levels) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Side_load(SideObject *self, PyObject *levels)
{
    if (side_load(self, levels) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Side_clear(SideObject *self, PyObject *Py_UNUSED(ignored))
{
    side_clear(self);
    Py_RETURN_NONE;
}

static PyObject *
Side_best(SideObject *self, PyObject *Py_UNUSED(ignored))
{
    return side_best(self);
}

static PyObject *
Side_top(SideObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    return side_top(self, n);
}

static PyObject *
Side_trim(SideObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    side_trim(self, n);
    Py_RETURN_NONE;
}

static PyObject *
Side_get_levels(SideObject *self, void *Py_UNUSED(closure))
{
    /* price -> size of every level, as the reference keeps them (a copy: for inspection only) */
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = self->n - 1; k >= 0; k--) {
        PyObject *price = PyFloat_FromDouble(self->sign * self->levels[k].key);
        PyObject *size = PyFloat_FromDouble(self->levels[k].size);
        int failed = price == NULL || size == NULL || PyDict_SetItem(out, price, size) < 0;
        Py_XDECREF(price);
        Py_XDECREF(size);
        if (failed) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *
Side_get_sign(SideObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->sign);
}

static PyMethodDef Side_methods[] = {
    {"set", (PyCFunction)(void (*)(void))Side_set, METH_FASTCALL, "Absolute size at price; 0 removes the level."},
    {"update", (PyCFunction)Side_update, METH_O, "set for many (price, size) levels."},
    {"load", (PyCFunction)Side_load, METH_O, "Replace the side wholesale."},
    {"clear", (PyCFunction)Side_clear, METH_NOARGS, NULL},
    {"best", (PyCFunction)Side_best, METH_NOARGS, "The best price, or None."},
    {"top", (PyCFunction)Side_top, METH_O, "The best n levels as (price, size), best first."},
    {"trim", (PyCFunction)Side_trim, METH_O, "Forget the levels furthest from the touch beyond max_levels."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Side_getset[] = {
    {"levels", (getter)Side_get_levels, NULL, "price -> size of every level (a copy).", NULL},
    {"sign", (getter)Side_get_sign, NULL, "-1 for bids, 1 for asks.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Side_as_sequence = {
    .sq_length = (lenfunc)Side_len,
};

static PyTypeObject SideType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "services.collector._cbook.BookSide",
    .tp_basicsize = sizeof(SideObject),
    .tp_dealloc = (destructor)Side_dealloc,
    .tp_as_sequence = &Side_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One side of a compiled book: sorted levels, best last in memory, best first out.",
    .tp_methods = Side_methods,
    .tp_getset = Side_getset,
    .tp_new = Side_tp_new,
};

/* ------------------------------------------------------------------ OrderBook */

static PyObject *
Book_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"keep_strings", "max_levels", NULL};
    int keep = 0;
    Py_ssize_t max_levels = 20000;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$pn", kw, &keep, &max_levels))
        return NULL;
    if (keep) {
        PyErr_SetString(PyExc_ValueError, "the compiled book does not keep the original strings");
        return NULL;
    }
    BookObject *self = (BookObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->bids = side_new(-1);
    self->asks = side_new(1);
    if (self->bids == NULL || self->asks == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->max_levels = max_levels;
    return (PyObject *)self;
}

static void
Book_dealloc(BookObject *self)
{
    Py_XDECREF(self->bids);
    Py_XDECREF(self->asks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void
book_bound(BookObject *self)
{
    /* Diff feeds add far-away levels forever; the touch is all anyone reads. */
    side_trim(self->bids, self->max_levels);
    side_trim(self->asks, self->max_levels);
}

static PyObject *
Book_apply(BookObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "apply(bids, asks)");
        return NULL;
    }
    if (side_update(self->bids, args[0]) < 0 || side_update(self->asks, args[1]) < 0)
        return NULL;
    if (self->bids->n > self->max_levels || self->asks->n > self->max_levels)
        book_bound(self);
    Py_RETURN_NONE;
}

static PyObject *
Book_replace(BookObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "replace(bids, asks)");
        return NULL;
    }
    if (side_load(self->bids, args[0]) < 0 || side_load(self->asks, args[1]) < 0)
        return NULL;
    book_bound(self);
    Py_RETURN_NONE;
}

static PyObject *
Book_clear(BookObject *self, PyObject *Py_UNUSED(ignored))
{
    side_clear(self->bids);
    side_clear(self->asks);
    Py_RETURN_NONE;
}

static PyObject *
Book_best_bid(BookObject *self, PyObject *Py_UNUSED(ignored))
{
    return side_best(self->bids);
}

static PyObject *
Book_best_ask(BookObject *self, PyObject *Py_UNUSED(ignored))
{
    return side_best(self->asks);
}

static PyObject *
Book_crossed(BookObject *self, PyObject *Py_UNUSED(ignored))
{
    /* Best bid at or above best ask: a book no exchange can have. */
    const SideObject *b = self->bids, *a = self->asks;
    if (b->n && a->n && -b->levels[b->n - 1].key >= a->levels[a->n - 1].key)
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *
Book_top(BookObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    PyObject *bids = side_top(self->bids, n);
    if (bids == NULL)
        return NULL;
    PyObject *asks = side_top(self->asks, n);
    if (asks == NULL) {
        Py_DECREF(bids);
        return NULL;
    }
    PyObject *out = PyTuple_Pack(2, bids, asks);
    Py_DECREF(bids);
    Py_DECREF(asks);
    return out;
}

static int
Book_bool(BookObject *self)
{
    return self->bids->n > 0 || self->asks->n > 0;
}

static PyObject *
Book_get_bids(BookObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef((PyObject *)self->bids);
}

static PyObject *
Book_get_asks(BookObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef((PyObject *)self->asks);
}

static PyObject *
Book_get_max_levels(BookObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->max_levels);
}

static int
Book_set_max_levels(BookObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete max_levels");
        return -1;
    }
    Py_ssize_t n = PyLong_AsSsize_t(value);
    if (n == -1 && PyErr_Occurred())
        return -1;
    self->max_levels = n;
    return 0;
}

static PyMethodDef Book_methods[] = {
    {"apply", (PyCFunction)(void (*)(void))Book_apply, METH_FASTCALL, "Absolute-size updates (0 deletes)."},
    {"replace", (PyCFunction)(void (*)(void))Book_replace, METH_FASTCALL, "Replace both sides (snapshots)."},
    {"clear", (PyCFunction)Book_clear, METH_NOARGS, NULL},
    {"best_bid", (PyCFunction)Book_best_bid, METH_NOARGS, NULL},
    {"best_ask", (PyCFunction)Book_best_ask, METH_NOARGS, NULL},
    {"crossed", (PyCFunction)Book_crossed, METH_NOARGS, "Best bid at or above best ask."},
    {"top", (PyCFunction)Book_top, METH_O, "(bids, asks): the best n levels of each side."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Book_getset[] = {
    {"bids", (getter)Book_get_bids, NULL, NULL, NULL},
    {"asks", (getter)Book_get_asks, NULL, NULL, NULL},
    {"max_levels", (getter)Book_get_max_levels, (setter)Book_set_max_levels, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyNumberMethods Book_as_number = {
    .nb_bool = (inquiry)Book_bool,
};

static PyTypeObject BookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "services.collector._cbook.OrderBook",
    .tp_basicsize = sizeof(BookObject),
    .tp_dealloc = (destructor)Book_dealloc,
    .tp_as_number = &Book_as_number,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled L2 book: the interface of services.collector.book.OrderBook without strings.",
    .tp_methods = Book_methods,
    .tp_getset = Book_getset,
    .tp_new = Book_tp_new,
};

/* ------------------------------------------------------------------ module */

static struct PyModuleDef cbook_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "services.collector._cbook",
    .m_doc = "The collector's L2 order book, compiled (see services/collector/book.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__cbook(void)
{
    if (PyType_Ready(&SideType) < 0 || PyType_Ready(&BookType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&cbook_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "BookSide", (PyObject *)&SideType) < 0
        || PyModule_AddObjectRef(m, "OrderBook", (PyObject *)&BookType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
