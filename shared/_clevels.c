/* Checking a book's levels, compiled: services/detector/books.py runs it on every book update.
 *
 * ordered(levels, descending) answers what the pure-Python reference there
 * (``ordered_levels``) answers for levels made of (float, float) tuples: strictly monotonic,
 * positive, finite prices and positive, finite sizes. For anything else (other sequences,
 * other number types) it returns None and the reference decides.
 * tests/test_detector_spatial_property.py checks the two agree on random levels.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

static PyObject *
ordered(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ordered(levels, descending)");
        return NULL;
    }
    PyObject *levels = args[0];
    int descending = PyObject_IsTrue(args[1]);
    if (descending < 0)
        return NULL;
    if (!PyList_CheckExact(levels) || PyList_GET_SIZE(levels) == 0)
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(levels);
    /* Every level first: a level the fast path cannot read leaves the whole answer to the reference. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *level = PyList_GET_ITEM(levels, i);
        if (!PyTuple_CheckExact(level) || PyTuple_GET_SIZE(level) < 2
            || !PyFloat_CheckExact(PyTuple_GET_ITEM(level, 0)) || !PyFloat_CheckExact(PyTuple_GET_ITEM(level, 1)))
            Py_RETURN_NONE;
    }
    double total = 0.0;
    int sizes_positive = 1;
    double previous = 0.0;
    int monotonic = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *level = PyList_GET_ITEM(levels, i);
        double price = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(level, 0));
        double size = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(level, 1));
        total += size;
        if (!(size > 0.0)) /* NaN too */
            sizes_positive = 0;
        if (i > 0 && !(descending ? previous > price : previous < price)) /* NaN fails every comparison */
            monotonic = 0;
        previous = price;
    }
    if (!(0.0 < total && total < INFINITY) || !sizes_positive)
        Py_RETURN_FALSE;
    double first = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(PyList_GET_ITEM(levels, 0), 0));
    double last = previous;
    int ends = descending ? (first < INFINITY && last > 0.0) : (first > 0.0 && last < INFINITY);
    if (ends && monotonic)
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"ordered", (PyCFunction)(void (*)(void))ordered, METH_FASTCALL,
     "ordered(levels, descending) -> bool, or None when the levels are not (float, float) tuples in a list."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef clevels_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shared._clevels",
    .m_doc = "Book level checks, compiled (see services/detector/books.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__clevels(void)
{
    return PyModule_Create(&clevels_module);
}
