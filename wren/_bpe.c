/* wren's compiled BPE merge loop (wren/compact_bpe.py holds the tables and does the rest).

   One call encodes one word (a run of Unicode code points with no added token in it) exactly as the HF
   `tokenizers` BPE model does with byte fallback: each code point becomes its vocabulary id, or its UTF-8
   bytes' "<0xXX>" ids, or the (fused) unknown id; then the pair of adjacent symbols whose merge has the
   lowest rank merges first, the leftmost among equal ranks, until no adjacent pair has a merge.

   The tables are sorted arrays built once by numpy (a few MB for a 262k vocabulary, where the HF model's
   hash maps of strings take ~95 MB): a merge is found by bisecting the few pairs of its left id, a character
   by indexing (or, above U+FFFF, bisecting). Portable C, no SIMD: it builds wherever the
   extension builds, and wren falls back to `tokenizers` where it does not. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const uint64_t *pair_keys; /* sorted (left id << 32 | right id) */
    const uint64_t *pair_vals; /* (rank << 32 | merged id), beside each key */
    const int64_t *left_start; /* [vocabulary + 1]: where each left id's pairs start in pair_keys */
    Py_ssize_t n_vocab;
    const int32_t *bmp_ids;      /* [65536]: the id of each one-character piece below U+10000, or -1 */
    const uint32_t *char_points; /* sorted code points of the one-character pieces above U+FFFF */
    const int32_t *char_ids;
    Py_ssize_t n_chars;
    const int32_t *byte_ids; /* [256]: the id of "<0xXX>", or -1 */
    int32_t unk_id;          /* -1: none */
} tables;

typedef struct {
    int32_t id;
    int32_t prev, next; /* -1 at either end */
    int alive;
} symbol;

typedef struct {
    uint32_t rank;
    int32_t pos;
    int32_t merged;
} candidate;

static int pair_lookup(const tables *t, int32_t left, int32_t right, uint32_t *rank, int32_t *merged) {
    if (left < 0 || left >= t->n_vocab) return 0;
    const uint64_t key = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    Py_ssize_t lo = t->left_start[left], hi = t->left_start[left + 1]; /* a few pairs, not all ~500k */
    const Py_ssize_t end = hi;
    while (lo < hi) {
        const Py_ssize_t mid = lo + (hi - lo) / 2;
        if (t->pair_keys[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    if (lo == end || t->pair_keys[lo] != key) return 0;
    *rank = (uint32_t)(t->pair_vals[lo] >> 32);
    *merged = (int32_t)(uint32_t)t->pair_vals[lo];
    return 1;
}

static int32_t char_lookup(const tables *t, uint32_t point) {
    if (point < 65536) return t->bmp_ids[point];
    Py_ssize_t lo = 0, hi = t->n_chars;
    while (lo < hi) {
        const Py_ssize_t mid = lo + (hi - lo) / 2;
        if (t->char_points[mid] < point) lo = mid + 1;
        else hi = mid;
    }
    return lo < t->n_chars && t->char_points[lo] == point ? t->char_ids[lo] : -1;
}

static int utf8_bytes(uint32_t point, uint8_t out[4]) {
    if (point < 0x80) { out[0] = (uint8_t)point; return 1; }
    if (point < 0x800) { out[0] = 0xC0 | (point >> 6); out[1] = 0x80 | (point & 0x3F); return 2; }
    if (point < 0x10000) {
        out[0] = 0xE0 | (point >> 12); out[1] = 0x80 | ((point >> 6) & 0x3F); out[2] = 0x80 | (point & 0x3F);
        return 3;
    }
    out[0] = 0xF0 | (point >> 18); out[1] = 0x80 | ((point >> 12) & 0x3F);
    out[2] = 0x80 | ((point >> 6) & 0x3F); out[3] = 0x80 | (point & 0x3F);
    return 4;
}

/* The first candidate is the lowest rank, then the lowest position: a binary min-heap. */
static int before(const candidate *a, const candidate *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(candidate *heap, Py_ssize_t *n, candidate c) {
    Py_ssize_t i = (*n)++;
    while (i > 0) {
        const Py_ssize_t up = (i - 1) / 2;
        if (!before(&c, &heap[up])) break;
        heap[i] = heap[up];
        i = up;
    }
    heap[i] = c;
}

static candidate heap_pop(candidate *heap, Py_ssize_t *n) {
    const candidate top = heap[0], last = heap[--(*n)];
    Py_ssize_t i = 0;
    for (;;) {
        Py_ssize_t child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && before(&heap[child + 1], &heap[child])) child++;
        if (!before(&heap[child], &last)) break;
        heap[i] = heap[child];
        i = child;
    }
    if (*n > 0) heap[i] = last;
    return top;
}

static void push_pair(const tables *t, const symbol *s, int32_t pos, candidate *heap, Py_ssize_t *n) {
    uint32_t rank;
    int32_t merged;
    if (s[pos].next >= 0 && pair_lookup(t, s[pos].id, s[s[pos].next].id, &rank, &merged)) {
        const candidate c = {rank, pos, merged};
        heap_push(heap, n, c);
    }
}

/* The word's symbols before any merge, as the HF model's merge_word makes them. Returns their count. */
static Py_ssize_t initial_symbols(const tables *t, const uint32_t *points, Py_ssize_t n, symbol *s) {
    Py_ssize_t count = 0;
    int pending_unk = 0; /* unknown characters fuse into one unknown symbol */
    for (Py_ssize_t i = 0; i < n; i++) {
        const int32_t id = char_lookup(t, points[i]);
        uint8_t bytes[4];
        const int nb = id < 0 ? utf8_bytes(points[i], bytes) : 0;
        int fallback = id < 0;
        for (int b = 0; b < nb; b++) fallback &= t->byte_ids[bytes[b]] >= 0;
        if (id >= 0) {
            if (pending_unk) s[count++].id = t->unk_id, pending_unk = 0;
            s[count++].id = id;
        } else if (fallback) { /* a pending unknown stays pending, after these bytes, as `tokenizers` has it */
            for (int b = 0; b < nb; b++) s[count++].id = t->byte_ids[bytes[b]];
        } else if (t->unk_id >= 0) {
            pending_unk = 1;
        } /* else: no id at all, and the character is dropped, as `tokenizers` drops it */
    }
    if (pending_unk) s[count++].id = t->unk_id;
    for (Py_ssize_t i = 0; i < count; i++) {
        s[i].prev = (int32_t)i - 1;
        s[i].next = i + 1 < count ? (int32_t)i + 1 : -1;
        s[i].alive = 1;
    }
    return count;
}

/* Encodes `points` into `out` (room for 4 ids a point). Returns the number of ids, or -1 out of memory. */
static Py_ssize_t encode_word(const tables *t, const uint32_t *points, Py_ssize_t n, int32_t *out) {
    symbol *s = malloc(sizeof(symbol) * (size_t)(4 * n + 1));
    candidate *heap = malloc(sizeof(candidate) * (size_t)(12 * n + 1)); /* each merge pushes at most two */
    if (!s || !heap) {
        free(s);
        free(heap);
        return -1;
    }
    const Py_ssize_t count = initial_symbols(t, points, n, s);
    Py_ssize_t queued = 0;
    for (int32_t i = 0; i + 1 < count; i++) push_pair(t, s, i, heap, &queued);
    while (queued > 0) {
        const candidate c = heap_pop(heap, &queued);
        symbol *left = &s[c.pos];
        if (!left->alive || left->next < 0) continue;
        uint32_t rank;
        int32_t merged;
        /* stale: the pair at this position changed since it was queued */
        if (!pair_lookup(t, left->id, s[left->next].id, &rank, &merged) || merged != c.merged) continue;
        symbol *right = &s[left->next];
        left->id = c.merged;
        right->alive = 0;
        left->next = right->next;
        if (right->next >= 0) s[right->next].prev = c.pos;
        if (left->prev >= 0) push_pair(t, s, left->prev, heap, &queued);
        push_pair(t, s, c.pos, heap, &queued);
    }
    Py_ssize_t written = 0;
    for (int32_t i = count > 0 ? 0 : -1; i >= 0; i = s[i].next) out[written++] = s[i].id;
    free(s);
    free(heap);
    return written;
}

static int read_ints(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, long long *out) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < want; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

static PyObject *py_encode_word(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long a[13];
    /* pair_keys, pair_vals, left_start, n_vocab, bmp_ids, char_points, char_ids, n_chars, byte_ids, unk_id,
       points, n, out: addresses of contiguous numpy arrays and their lengths; `out` holds 4 * n int32 */
    if (read_ints(args, nargs, 13, a) < 0) return NULL;
    const tables t = {(const uint64_t *)(intptr_t)a[0], (const uint64_t *)(intptr_t)a[1],
                      (const int64_t *)(intptr_t)a[2], (Py_ssize_t)a[3], (const int32_t *)(intptr_t)a[4],
                      (const uint32_t *)(intptr_t)a[5], (const int32_t *)(intptr_t)a[6], (Py_ssize_t)a[7],
                      (const int32_t *)(intptr_t)a[8], (int32_t)a[9]};
    if (a[11] < 0 || a[11] > (1LL << 28)) {
        PyErr_SetString(PyExc_ValueError, "a word of a negative length or over 2**28 code points");
        return NULL;
    }
    Py_ssize_t written;
    Py_BEGIN_ALLOW_THREADS
    written = encode_word(&t, (const uint32_t *)(intptr_t)a[10], (Py_ssize_t)a[11], (int32_t *)(intptr_t)a[12]);
    Py_END_ALLOW_THREADS
    if (written < 0) return PyErr_NoMemory();
    return PyLong_FromSsize_t(written);
}

static PyMethodDef methods[] = {
    {"encode_word", (PyCFunction)(void (*)(void))py_encode_word, METH_FASTCALL,
     "encode_word(pair_keys, pair_vals, left_start, n_vocab, bmp_ids, char_points, char_ids, n_chars, byte_ids, "
     "unk_id, points, n, out) -> ids written to out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bpe", "wren's compiled BPE merge loop", -1, methods};

PyMODINIT_FUNC PyInit__bpe(void) { return PyModule_Create(&module); }
