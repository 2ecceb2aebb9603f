/*
 * pgveil_accel: pgveil's optional native hot path, a plain CPython extension over OpenSSL's libcrypto.
 *
 * What it owns: AES-256-GCM cipher contexts per data key (Key), the opening of v1 envelopes with a small
 * per-result key cache (Opener), the DataRow batch kernel (rewrite_rows, with the subject check of
 * per-subject keys) and the scan for the end of a run of DataRows (data_row_run). What it must not do: decide policy, look keys up itself (it calls
 * back into keymgmt for that), log, or keep any value after a call returns.
 *
 * The pure-Python code is the reference: keymgmt/envelope.py defines the envelope layout (this file
 * mirrors it, and keymgmt checks the constants exported below before using the module), and
 * proxy/encrypt/rows.py defines what rewrite_rows must do, byte for byte and error for error.
 *
 * Envelope v1 (keymgmt/envelope.py): magic "PV" . version 0x01 . algorithm 0x01 . key id (16) .
 * nonce (12) . ciphertext (n) . tag (16). Associated data: header (bytes 0..31) . column's bytes.
 *
 * DataRow (PostgreSQL docs, "Message Formats"): Byte1 'D' . Int32 length (self-inclusive) . Int16 column
 * count . per column Int32 length (negative: NULL, no bytes) and the value's bytes.
 *
 * Memory safety: every byte read is from a bytes object (immutable, so a callback into Python cannot
 * move or resize it under us) at an offset checked against the run's end or the row's end first, with
 * 64-bit arithmetic on lengths read from the wire (an Int32 is at most 2**31 - 1, offsets are
 * Py_ssize_t). The output buffer is allocated at the input's size (every rewrite shrinks a value) and
 * every write is checked against its capacity anyway.
 *
 * Threads: a Key's two EVP contexts are used only while the calling thread holds the GIL, from
 * initialisation with a nonce to the tag check, so no two threads ever use one context at the same
 * time, and each use starts from a fresh nonce. The module does not declare free-threading support, so
 * a free-threaded interpreter runs it with the GIL enabled. Key material is handed to OpenSSL and, for
 * the own open, expanded once into the Key (pgveil_gcm.c); EVP_CIPHER_CTX_free and pv_gcm_wipe clear the
 * expanded keys when the Key is dropped.
 *
 * Opens (the DataRow kernel, Key.decrypt) run pgveil_gcm.c's AES-256-GCM with AES-NI and PCLMULQDQ where
 * the CPU has them and it agrees, when the module loads, with the GCM specification's test cases and with
 * OpenSSL on inputs of every length class; otherwise, or with PGVEIL_GCM=evp, OpenSSL's EVP. Seals are
 * always EVP.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "pgveil_gcm.h"

#define ACCEL_VERSION "5"

#define KEY_ID_LENGTH 16
#define NONCE_LENGTH 12
#define TAG_LENGTH 16
#define DEK_LENGTH 32
#define PREFIX_LENGTH 4                              /* magic . version . algorithm */
#define KEY_END (PREFIX_LENGTH + KEY_ID_LENGTH)      /* 20: where the nonce starts */
#define HEADER_LENGTH (KEY_END + NONCE_LENGTH)       /* 32 */
#define MIN_LENGTH (HEADER_LENGTH + TAG_LENGTH)      /* 48: an envelope of the empty plaintext */
/* Keys an Opener keeps without calling back: an open-addressed table by key id, each key in one of
 * OPENER_WAYS consecutive slots. It starts small (an Opener made for one value or a small result costs
 * little) and grows four-fold, up to OPENER_MAX_SLOTS, when it is half full or a key finds its slots
 * taken, so that a result of thousands of data subjects' keys calls back about once per key (with a
 * fixed 1,024 slots, a thousand keys evicted each other: some 280 callbacks per pass over them). */
#define OPENER_MIN_SLOTS 64
#define OPENER_MAX_SLOTS 16384
#define OPENER_WAYS 4

static const unsigned char PREFIX_V1[PREFIX_LENGTH] = {'P', 'V', 0x01, 0x01};

static PyObject *InvalidTag;   /* a tag that does not verify (Key.decrypt) */
static PyObject *RowRefused;   /* (reason, column index or -1): a value or row that cannot be delivered */
static PyObject *Malformed;    /* a DataRow run that breaks the protocol's framing */
static PyObject *Unsupported;  /* a value form left to the Python kernel (escape-format bytea text) */

static inline uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline void
put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* -- AES-256-GCM ------------------------------------------------------------------------------------ */

/* A data subject's part of the associated data (keymgmt.envelope.subject_associated_data) is at most
 * this long in a Key (longer subject ids stay on the Python Opener). */
#define MAX_SUBJECT_SUFFIX 192

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
    /* The open's own AES-256-GCM (native/pgveil_gcm.c) where gcm_fast is set: the key schedule and the
     * GHASH key powers, wiped when the Key is dropped. has_fast is 0 where it is not used (EVP opens). */
    int has_fast;
    pv_gcm_key fast;
    /* Per-subject keys: what the Opener appends to a column's associated data for this key (the
     * subject's kind and id, from the keystore record); empty for a column's key. Key.encrypt, decrypt
     * and seal do not append it: their callers pass the whole associated data. */
    Py_ssize_t suffix_len;
    unsigned char suffix[MAX_SUBJECT_SUFFIX];
} KeyObject;

static PyTypeObject KeyType;

/* Which open runs (decided once, in PyInit_pgveil_accel): 1, pgveil_gcm's AES-NI and PCLMULQDQ code;
 * 0, OpenSSL's EVP, for the reason in gcm_why. Sealing is always EVP. */
static int gcm_fast;
static const char *gcm_why = "not decided";

/* The EVP sequence of an open. 0: authentic, plaintext in out; 1: the tag does not verify; -1: OpenSSL
 * failed (exception set). Lengths are checked by callers to fit an int. */
static int
gcm_open_evp(EVP_CIPHER_CTX *ctx, const unsigned char *nonce, const unsigned char *aad1, size_t aad1_len,
             const unsigned char *aad2, size_t aad2_len, const unsigned char *ciphertext, size_t ciphertext_len,
             const unsigned char *tag, unsigned char *out)
{
    int outl = 0;
    /* One AAD update where the two parts fit a small buffer: each EVP call costs tens of nanoseconds. */
    unsigned char joined[256];
    if (aad2_len > 0 && aad1_len + aad2_len <= sizeof(joined)) {
        memcpy(joined, aad1, aad1_len);
        memcpy(joined + aad1_len, aad2, aad2_len);
        aad1 = joined;
        aad1_len += aad2_len;
        aad2_len = 0;
    }
    /* The tag is set with OSSL_PARAM directly: EVP_CIPHER_CTX_ctrl would translate to the same. */
    OSSL_PARAM params[2] = {
        OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, (void *)tag, TAG_LENGTH),
        OSSL_PARAM_construct_end(),
    };
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1)
        goto error;
    if (aad1_len > 0 && EVP_DecryptUpdate(ctx, NULL, &outl, aad1, (int)aad1_len) != 1)
        goto error;
    if (aad2_len > 0 && EVP_DecryptUpdate(ctx, NULL, &outl, aad2, (int)aad2_len) != 1)
        goto error;
    if (ciphertext_len > 0 && EVP_DecryptUpdate(ctx, out, &outl, ciphertext, (int)ciphertext_len) != 1)
        goto error;
    if (EVP_CIPHER_CTX_set_params(ctx, params) != 1)
        goto error;
    if (EVP_DecryptFinal_ex(ctx, out + ciphertext_len, &outl) != 1)
        return 1;
    return 0;
error:
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-GCM decryption failed");
    return -1;
}

/* An open under key: its own GCM where it has one (and the associated data fits it), else EVP. Same
 * results as gcm_open_evp; out is written only when the tag verifies. */
static inline int
gcm_open(const KeyObject *key, const unsigned char *nonce, const unsigned char *aad1, size_t aad1_len,
         const unsigned char *aad2, size_t aad2_len, const unsigned char *ciphertext, size_t ciphertext_len,
         const unsigned char *tag, unsigned char *out)
{
    if (key->has_fast) {
        int r = pv_gcm_open(&key->fast, nonce, aad1, aad1_len, aad2, aad2_len, ciphertext, ciphertext_len, tag, out);
        if (r >= 0)
            return r;
    }
    return gcm_open_evp(key->dec, nonce, aad1, aad1_len, aad2, aad2_len, ciphertext, ciphertext_len, tag, out);
}

/* Encrypts into out (ciphertext_len bytes) and tag_out (16 bytes). 0, or -1 with an exception set. */
static int
gcm_seal(EVP_CIPHER_CTX *ctx, const unsigned char *nonce, const unsigned char *aad1, size_t aad1_len,
         const unsigned char *aad2, size_t aad2_len, const unsigned char *plaintext, size_t plaintext_len,
         unsigned char *out, unsigned char *tag_out)
{
    int outl = 0;
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1)
        goto error;
    if (aad1_len > 0 && EVP_EncryptUpdate(ctx, NULL, &outl, aad1, (int)aad1_len) != 1)
        goto error;
    if (aad2_len > 0 && EVP_EncryptUpdate(ctx, NULL, &outl, aad2, (int)aad2_len) != 1)
        goto error;
    if (plaintext_len > 0 && EVP_EncryptUpdate(ctx, out, &outl, plaintext, (int)plaintext_len) != 1)
        goto error;
    if (EVP_EncryptFinal_ex(ctx, out + plaintext_len, &outl) != 1)
        goto error;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LENGTH, tag_out) != 1)
        goto error;
    return 0;
error:
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-GCM encryption failed");
    return -1;
}

/* Nonces come from the OS CSPRNG (getrandom(2), blocking only before the kernel's pool is initialised),
 * read NONCE_BATCH at a time: one system call per value cost about as much as the value's AES-GCM (about
 * 200 ns each here). What makes a batch safe, since a GCM nonce handed out twice under one key is
 * catastrophic:
 * - each nonce is taken from the batch once: the taken bytes are wiped and the count of what is left
 *   goes down before the nonce is used;
 * - threads: the batch is used only while the calling thread holds the GIL (Key.seal never releases it;
 *   the module does not declare free-threading support, so a free-threaded interpreter keeps the GIL);
 * - fork: the batch and its count live in one page marked MADV_WIPEONFORK, which the kernel hands to any
 *   child process zeroed (a child sees nothing left and reads a batch of its own), whatever made the
 *   child (os.fork, a C library's fork, clone); where the kernel refuses the mark (Linux before 4.14),
 *   there is no batch: one getrandom call per nonce, as before. */
#define NONCE_BATCH 256

typedef struct {
    size_t left;                                   /* nonces not yet taken, at the end of bytes */
    unsigned char bytes[NONCE_BATCH * NONCE_LENGTH];
} NonceBatch;

static NonceBatch *nonce_batch;  /* NULL: no batch (not set up yet, or the kernel refused the mark) */
static int nonce_batch_tried;

static int
fill_random(unsigned char *out, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = getrandom(out + got, n - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        got += (size_t)r;
    }
    return 0;
}

static void
setup_nonce_batch(void)
{
    nonce_batch_tried = 1;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || (size_t)page < sizeof(NonceBatch))
        return;
    void *p = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return;
#ifdef MADV_WIPEONFORK
    if (madvise(p, (size_t)page, MADV_WIPEONFORK) == 0) {
        nonce_batch = (NonceBatch *)p; /* zeroed by mmap: nothing left */
        return;
    }
#endif
    munmap(p, (size_t)page);
}

static int
random_nonce(unsigned char *out)
{
    if (!nonce_batch_tried)
        setup_nonce_batch();
    NonceBatch *b = nonce_batch;
    if (b == NULL)
        return fill_random(out, NONCE_LENGTH);
    if (b->left == 0 || b->left > NONCE_BATCH) {
        b->left = 0;
        if (fill_random(b->bytes, sizeof(b->bytes)) < 0)
            return -1;
        b->left = NONCE_BATCH;
    }
    b->left--;
    unsigned char *taken = b->bytes + b->left * NONCE_LENGTH;
    memcpy(out, taken, NONCE_LENGTH);
    OPENSSL_cleanse(taken, NONCE_LENGTH);
    return 0;
}

static int
check_int_length(Py_ssize_t n, const char *what)
{
    if (n < 0 || n > INT_MAX - 2 * TAG_LENGTH) {
        PyErr_Format(PyExc_OverflowError, "%s is too long", what);
        return -1;
    }
    return 0;
}

static PyObject *
Key_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_buffer material, suffix = {0};
    static char *kwlist[] = {"material", "subject", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|y*:Key", kwlist, &material, &suffix))
        return NULL;
    if (material.len != DEK_LENGTH || suffix.len > MAX_SUBJECT_SUFFIX) {
        PyBuffer_Release(&material);
        if (suffix.obj) PyBuffer_Release(&suffix);
        PyErr_Format(PyExc_ValueError, "data key material must be %d bytes, a subject at most %d", DEK_LENGTH,
                     MAX_SUBJECT_SUFFIX);
        return NULL;
    }
    KeyObject *self = (KeyObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyBuffer_Release(&material);
        if (suffix.obj) PyBuffer_Release(&suffix);
        return NULL;
    }
    self->suffix_len = suffix.len;
    if (suffix.len > 0)
        memcpy(self->suffix, suffix.buf, (size_t)suffix.len);
    if (suffix.obj) PyBuffer_Release(&suffix);
    self->enc = EVP_CIPHER_CTX_new();
    self->dec = EVP_CIPHER_CTX_new();
    int ok = self->enc != NULL && self->dec != NULL &&
             EVP_EncryptInit_ex(self->enc, EVP_aes_256_gcm(), NULL, material.buf, NULL) == 1 &&
             EVP_DecryptInit_ex(self->dec, EVP_aes_256_gcm(), NULL, material.buf, NULL) == 1 &&
             EVP_CIPHER_CTX_iv_length(self->enc) == NONCE_LENGTH;
    /* The own open needs its schedule 16-byte aligned (the allocator gives that; checked, not assumed). */
    self->has_fast = 0;
    if (ok && gcm_fast && ((uintptr_t)&self->fast % 16) == 0) {
        pv_gcm_init(&self->fast, material.buf);
        self->has_fast = 1;
    }
    PyBuffer_Release(&material);
    if (!ok) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up AES-256-GCM");
        return NULL;
    }
    return (PyObject *)self;
}

static void
Key_dealloc(KeyObject *self)
{
    /* EVP_CIPHER_CTX_free clears the key schedule (OPENSSL_clear_free in the GCM provider). */
    EVP_CIPHER_CTX_free(self->enc);
    EVP_CIPHER_CTX_free(self->dec);
    self->enc = self->dec = NULL;
    pv_gcm_wipe(&self->fast);
    self->has_fast = 0;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Key.encrypt(nonce, data, associated_data) -> ciphertext . tag, as cryptography's AESGCM. */
static PyObject *
Key_encrypt(KeyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer nonce = {0}, data = {0}, aad = {0};
    PyObject *result = NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encrypt(nonce, data, associated_data)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &nonce, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[2], &aad, PyBUF_SIMPLE) < 0)
        goto done;
    if (nonce.len != NONCE_LENGTH) {
        PyErr_Format(PyExc_ValueError, "nonce must be %d bytes", NONCE_LENGTH);
        goto done;
    }
    if (check_int_length(data.len, "data") < 0 || check_int_length(aad.len, "associated data") < 0)
        goto done;
    result = PyBytes_FromStringAndSize(NULL, data.len + TAG_LENGTH);
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    if (gcm_seal(self->enc, nonce.buf, aad.buf, (size_t)aad.len, NULL, 0, data.buf, (size_t)data.len, out,
                 out + data.len) < 0)
        Py_CLEAR(result);
done:
    if (nonce.obj) PyBuffer_Release(&nonce);
    if (data.obj) PyBuffer_Release(&data);
    if (aad.obj) PyBuffer_Release(&aad);
    return result;
}

/* Key.decrypt(nonce, data, associated_data) -> plaintext, or InvalidTag, as cryptography's AESGCM. */
static PyObject *
Key_decrypt(KeyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer nonce = {0}, data = {0}, aad = {0};
    PyObject *result = NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "decrypt(nonce, data, associated_data)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &nonce, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[2], &aad, PyBUF_SIMPLE) < 0)
        goto done;
    if (nonce.len != NONCE_LENGTH) {
        PyErr_Format(PyExc_ValueError, "nonce must be %d bytes", NONCE_LENGTH);
        goto done;
    }
    if (check_int_length(data.len, "data") < 0 || check_int_length(aad.len, "associated data") < 0)
        goto done;
    if (data.len < TAG_LENGTH) {
        PyErr_SetNone(InvalidTag);
        goto done;
    }
    Py_ssize_t n = data.len - TAG_LENGTH;
    result = PyBytes_FromStringAndSize(NULL, n);
    if (result == NULL)
        goto done;
    const unsigned char *in = data.buf;
    int r = gcm_open(self, nonce.buf, aad.buf, (size_t)aad.len, NULL, 0, in, (size_t)n, in + n,
                     (unsigned char *)PyBytes_AS_STRING(result));
    if (r != 0) {
        Py_CLEAR(result);
        if (r > 0)
            PyErr_SetNone(InvalidTag);
    }
done:
    if (nonce.obj) PyBuffer_Release(&nonce);
    if (data.obj) PyBuffer_Release(&data);
    if (aad.obj) PyBuffer_Release(&aad);
    return result;
}

/* Key.seal(prefix, plaintext, associated) -> envelope: prefix is magic . version . algorithm . key id
 * (20 bytes), the nonce comes from the OS CSPRNG, the associated data is header . associated. */
static PyObject *
Key_seal(KeyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer prefix = {0}, plaintext = {0}, assoc = {0};
    PyObject *result = NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "seal(prefix, plaintext, associated)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &prefix, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[1], &plaintext, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[2], &assoc, PyBUF_SIMPLE) < 0)
        goto done;
    if (prefix.len != KEY_END || memcmp(prefix.buf, PREFIX_V1, PREFIX_LENGTH) != 0) {
        PyErr_SetString(PyExc_ValueError, "prefix must be a v1 envelope's first 20 bytes");
        goto done;
    }
    if (check_int_length(plaintext.len, "plaintext") < 0 || check_int_length(assoc.len, "associated data") < 0)
        goto done;
    if (plaintext.len > PY_SSIZE_T_MAX - MIN_LENGTH) {
        PyErr_SetString(PyExc_OverflowError, "plaintext is too long");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, plaintext.len + MIN_LENGTH);
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    memcpy(out, prefix.buf, KEY_END);
    if (random_nonce(out + KEY_END) < 0 ||
        gcm_seal(self->enc, out + KEY_END, out, HEADER_LENGTH, assoc.buf, (size_t)assoc.len, plaintext.buf,
                 (size_t)plaintext.len, out + HEADER_LENGTH, out + HEADER_LENGTH + plaintext.len) < 0)
        Py_CLEAR(result);
done:
    if (prefix.obj) PyBuffer_Release(&prefix);
    if (plaintext.obj) PyBuffer_Release(&plaintext);
    if (assoc.obj) PyBuffer_Release(&assoc);
    return result;
}

static PyObject *
Key_repr(KeyObject *self)
{
    return PyUnicode_FromString("pgveil_accel.Key(AES-256-GCM)");
}

static PyMethodDef Key_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))Key_encrypt, METH_FASTCALL, "encrypt(nonce, data, associated_data)"},
    {"decrypt", (PyCFunction)(void (*)(void))Key_decrypt, METH_FASTCALL, "decrypt(nonce, data, associated_data)"},
    {"seal", (PyCFunction)(void (*)(void))Key_seal, METH_FASTCALL, "seal(prefix, plaintext, associated)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject KeyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgveil_accel.Key",
    .tp_basicsize = sizeof(KeyObject),
    .tp_dealloc = (destructor)Key_dealloc,
    .tp_repr = (reprfunc)Key_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One AES-256-GCM data key: an encryption and a decryption context, the key bytes inside OpenSSL.",
    .tp_methods = Key_methods,
    .tp_new = Key_new,
};

/* -- Opener: envelope checks and a small per-result key cache ------------------------------------------ */

typedef struct {
    unsigned char prefix[KEY_END];
    KeyObject *key; /* strong reference, or NULL */
} Slot;

typedef struct {
    PyObject_HEAD
    PyObject *find;  /* find(prefix: bytes) -> Key | str (the refusal reason); may raise */
    PyObject *error; /* error(reason: str) -> the exception Opener.open raises */
    Slot *slots;     /* capacity slots (PyMem), a power of two */
    unsigned int capacity;
    unsigned int used; /* slots holding a key */
} OpenerObject;

static PyTypeObject OpenerType;

static PyObject *
Opener_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *find, *error;
    static char *kwlist[] = {"find", "error", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:Opener", kwlist, &find, &error))
        return NULL;
    if (!PyCallable_Check(find) || !PyCallable_Check(error)) {
        PyErr_SetString(PyExc_TypeError, "find and error must be callable");
        return NULL;
    }
    Slot *slots = PyMem_Calloc(OPENER_MIN_SLOTS, sizeof(Slot));
    if (slots == NULL)
        return PyErr_NoMemory();
    OpenerObject *self = (OpenerObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyMem_Free(slots);
        return NULL;
    }
    Py_INCREF(find);
    Py_INCREF(error);
    self->find = find;
    self->error = error;
    self->slots = slots;
    self->capacity = OPENER_MIN_SLOTS;
    return (PyObject *)self;
}

static int
Opener_traverse(OpenerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->find);
    Py_VISIT(self->error);
    return 0;
}

static int
Opener_clear(OpenerObject *self)
{
    Py_CLEAR(self->find);
    Py_CLEAR(self->error);
    for (unsigned int i = 0; self->slots != NULL && i < self->capacity; i++)
        Py_CLEAR(self->slots[i].key);
    self->used = 0;
    return 0;
}

static void
Opener_dealloc(OpenerObject *self)
{
    PyObject_GC_UnTrack(self);
    Opener_clear(self);
    PyMem_Free(self->slots);
    self->slots = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Where a key id's slots start. All 16 bytes of the key id (bytes 4.. of the prefix) are mixed: a key id
 * need not be random (tests and benchmarks use patterned ones, and a result's keys colliding would call
 * back for every value). */
static inline unsigned int
slot_hash(const unsigned char *prefix)
{
    uint64_t lo, hi;
    memcpy(&lo, prefix + PREFIX_LENGTH, 8);
    memcpy(&hi, prefix + PREFIX_LENGTH + 8, 8);
    uint64_t mixed = (lo ^ (hi * 0x9e3779b97f4a7c15ull)) * 0xbf58476d1ce4e5b9ull;
    return (unsigned int)(mixed >> 40);
}

/* The first free slot of prefix's ways in slots[0:capacity], or NULL. */
static Slot *
free_slot(Slot *slots, unsigned int capacity, const unsigned char *prefix)
{
    unsigned int h = slot_hash(prefix);
    for (unsigned int way = 0; way < OPENER_WAYS; way++) {
        Slot *s = &slots[(h + way) & (capacity - 1)];
        if (s->key == NULL)
            return s;
    }
    return NULL;
}

/* Grows the table four-fold (at most to OPENER_MAX_SLOTS), moving every key; a key whose ways are taken
 * in the new table is dropped (found again by the next value that needs it). Without memory, the table
 * stays as it is: keys then replace each other, as in a full table. Runs no Python code. */
static void
opener_grow(OpenerObject *self)
{
    unsigned int capacity = self->capacity * 4;
    if (capacity > OPENER_MAX_SLOTS)
        capacity = OPENER_MAX_SLOTS;
    if (capacity <= self->capacity)
        return;
    Slot *slots = PyMem_Calloc(capacity, sizeof(Slot));
    if (slots == NULL)
        return;
    unsigned int used = 0;
    for (unsigned int i = 0; i < self->capacity; i++) {
        Slot *old = &self->slots[i];
        if (old->key == NULL)
            continue;
        Slot *s = free_slot(slots, capacity, old->prefix);
        if (s == NULL) {
            Py_DECREF(old->key);
        } else {
            memcpy(s->prefix, old->prefix, KEY_END);
            s->key = old->key;
            used++;
        }
        old->key = NULL;
    }
    PyMem_Free(self->slots);
    self->slots = slots;
    self->capacity = capacity;
    self->used = used;
}

/* The Key for an envelope's first 20 bytes (prefix already checked). Returns a borrowed Key, or NULL
 * with *reason set to a new reference (a refusal) or an exception set (find raised, or misbehaved). */
static KeyObject *
opener_key(OpenerObject *self, const unsigned char *prefix, PyObject **reason)
{
    *reason = NULL;
    if (self->slots == NULL || self->find == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Opener was cleared");
        return NULL;
    }
    unsigned int h = slot_hash(prefix);
    for (unsigned int way = 0; way < OPENER_WAYS; way++) {
        Slot *s = &self->slots[(h + way) & (self->capacity - 1)];
        if (s->key != NULL && memcmp(s->prefix, prefix, KEY_END) == 0)
            return s->key;
    }
    if (self->find == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Opener was cleared");
        return NULL;
    }
    PyObject *arg = PyBytes_FromStringAndSize((const char *)prefix, KEY_END);
    if (arg == NULL)
        return NULL;
    PyObject *found = PyObject_CallOneArg(self->find, arg);
    Py_DECREF(arg);
    if (found == NULL)
        return NULL;
    if (PyUnicode_Check(found)) {
        *reason = found; /* refused keys are not remembered: they may be fetched or enabled later */
        return NULL;
    }
    if (!PyObject_TypeCheck(found, &KeyType)) {
        Py_DECREF(found);
        PyErr_SetString(PyExc_TypeError, "find must return a pgveil_accel.Key or a reason");
        return NULL;
    }
    /* find ran Python code: the table is looked at anew. */
    if (self->slots == NULL) {
        Py_DECREF(found);
        PyErr_SetString(PyExc_RuntimeError, "the Opener was cleared");
        return NULL;
    }
    if (self->used >= self->capacity / 2)
        opener_grow(self);
    Slot *s = free_slot(self->slots, self->capacity, prefix);
    if (s == NULL && self->capacity < OPENER_MAX_SLOTS) {
        opener_grow(self);
        s = free_slot(self->slots, self->capacity, prefix);
    }
    if (s == NULL)
        s = &self->slots[slot_hash(prefix) & (self->capacity - 1)]; /* all ways taken: replace the first */
    else
        self->used++;
    KeyObject *old = s->key;
    memcpy(s->prefix, prefix, KEY_END);
    s->key = (KeyObject *)found; /* the slot takes the reference */
    Py_XDECREF(old);
    return s->key;
}

/* Outcome of opening one envelope: 0 opened, 1 refused (*reason is a new reference), -1 exception. */
static int
opener_open(OpenerObject *self, const unsigned char *env, Py_ssize_t size, const unsigned char *assoc,
            Py_ssize_t assoc_len, unsigned char *out, PyObject **reason)
{
    *reason = NULL;
    if (size < MIN_LENGTH || memcmp(env, PREFIX_V1, PREFIX_LENGTH) != 0) {
        *reason = PyUnicode_FromString("not_an_envelope");
        return *reason == NULL ? -1 : 1;
    }
    if (size > INT_MAX || assoc_len > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "envelope too long");
        return -1;
    }
    KeyObject *key = opener_key(self, env, reason);
    if (key == NULL)
        return *reason != NULL ? 1 : -1;
    /* Hold the key across the call: nothing below runs Python code, but be robust to future edits. */
    Py_INCREF(key);
    int r;
    if (key->suffix_len > 0) {
        /* A subject's key: the associated data is the column's part, then the key's subject part. */
        unsigned char joined[512];
        if (assoc_len + key->suffix_len > (Py_ssize_t)sizeof(joined)) {
            Py_DECREF(key);
            PyErr_SetString(PyExc_OverflowError, "associated data too long");
            return -1;
        }
        memcpy(joined, assoc, (size_t)assoc_len);
        memcpy(joined + assoc_len, key->suffix, (size_t)key->suffix_len);
        r = gcm_open(key, env + KEY_END, env, HEADER_LENGTH, joined, (size_t)(assoc_len + key->suffix_len),
                     env + HEADER_LENGTH, (size_t)(size - MIN_LENGTH), env + size - TAG_LENGTH, out);
    } else {
        r = gcm_open(key, env + KEY_END, env, HEADER_LENGTH, assoc, (size_t)assoc_len, env + HEADER_LENGTH,
                     (size_t)(size - MIN_LENGTH), env + size - TAG_LENGTH, out);
    }
    Py_DECREF(key);
    if (r > 0) {
        *reason = PyUnicode_FromString("authentication");
        return *reason == NULL ? -1 : 1;
    }
    return r;
}

static void
raise_with_reason(PyObject *error, PyObject *reason)
{
    PyObject *exc = PyObject_CallOneArg(error, reason);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

/* Opener.open(data, start, end, associated) -> the plaintext of the envelope data[start:end]. Takes any
 * bytes-like object: the buffers are held for the call, so a callback cannot resize a bytearray under it. */
static PyObject *
Opener_open(OpenerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "open(data, start, end, associated)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer data = {0}, assoc = {0};
    PyObject *result = NULL, *reason = NULL;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(args[3], &assoc, PyBUF_SIMPLE) < 0)
        goto done;
    if (start < 0 || end > data.len || end - start < MIN_LENGTH) {
        reason = PyUnicode_FromString("not_an_envelope");
        if (reason != NULL)
            raise_with_reason(self->error, reason);
        goto done;
    }
    Py_ssize_t size = end - start;
    result = PyBytes_FromStringAndSize(NULL, size - MIN_LENGTH);
    if (result == NULL)
        goto done;
    int r = opener_open(self, (const unsigned char *)data.buf + start, size, assoc.buf, assoc.len,
                        (unsigned char *)PyBytes_AS_STRING(result), &reason);
    if (r != 0) {
        Py_CLEAR(result);
        if (r > 0)
            raise_with_reason(self->error, reason);
    }
done:
    Py_XDECREF(reason);
    if (data.obj) PyBuffer_Release(&data);
    if (assoc.obj) PyBuffer_Release(&assoc);
    return result;
}

static PyMethodDef Opener_methods[] = {
    {"open", (PyCFunction)(void (*)(void))Opener_open, METH_FASTCALL, "open(data, start, end, associated)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject OpenerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgveil_accel.Opener",
    .tp_basicsize = sizeof(OpenerObject),
    .tp_dealloc = (destructor)Opener_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Opener(find, error): opens v1 envelopes, keeping the keys find returned for its life.",
    .tp_traverse = (traverseproc)Opener_traverse,
    .tp_clear = (inquiry)Opener_clear,
    .tp_methods = Opener_methods,
    .tp_new = Opener_new,
};

/* -- the DataRow batch kernel -------------------------------------------------------------------------- */

enum {
    COLUMN_COPIED = 0,
    COLUMN_BINARY = 1,
    COLUMN_HEX = 2,
    COLUMN_NULL = 3,
    COLUMN_SCREEN = 4,       /* an envelope anywhere in the value */
    COLUMN_SCREEN_WHOLE = 5, /* a bytea: an envelope only as the whole value */
};

/* What an envelope looks like inside a result value (proxy/encrypt/rows.py's ENVELOPE_MARKS and
 * carries_envelope): the raw header prefix, its hex after a backslash (bytea text output, any quoting
 * depth), and escape output PV\001\001 with each backslash doubled per level of quoting (one or more). */
static const unsigned char RAW_MARK[] = {'P', 'V', 0x01, 0x01};
static const unsigned char HEX_MARK[] = "\\x50560101"; /* 10 bytes and a NUL */

static int
starts_with(const unsigned char *v, Py_ssize_t n, const unsigned char *mark, Py_ssize_t mlen)
{
    return n >= mlen && memcmp(v, mark, (size_t)mlen) == 0;
}

/* Whether v[0:n] starts with PV, one or more backslashes, 001, one or more backslashes, 001. */
static int
escape_form_at(const unsigned char *v, Py_ssize_t n)
{
    Py_ssize_t i = 2, k;
    if (n < 2 || v[0] != 'P' || v[1] != 'V')
        return 0;
    for (int part = 0; part < 2; part++) {
        for (k = 0; i < n && v[i] == '\\'; i++, k++)
            ;
        if (k == 0 || n - i < 3 || v[i] != '0' || v[i + 1] != '0' || v[i + 2] != '1')
            return 0;
        i += 3;
    }
    return 1;
}

/* Whether mark occurs in v[0:n] (a plain search: values are short). */
static int
contains(const unsigned char *v, Py_ssize_t n, const unsigned char *mark, Py_ssize_t mlen)
{
    for (Py_ssize_t i = 0; i + mlen <= n; i++) {
        const unsigned char *hit = memchr(v + i, mark[0], (size_t)(n - mlen - i + 1));
        if (hit == NULL)
            return 0;
        i = hit - v;
        if (memcmp(hit, mark, (size_t)mlen) == 0)
            return 1;
    }
    return 0;
}

static int
carries_envelope(const unsigned char *v, Py_ssize_t n, int whole)
{
    if (whole)
        return starts_with(v, n, RAW_MARK, 4) || starts_with(v, n, HEX_MARK, 10) || escape_form_at(v, n);
    if (contains(v, n, RAW_MARK, 4) || contains(v, n, HEX_MARK, 10))
        return 1;
    for (Py_ssize_t i = 0; i + 2 <= n; i++) {
        const unsigned char *hit = memchr(v + i, 'P', (size_t)(n - i));
        if (hit == NULL)
            return 0;
        i = hit - v;
        if (escape_form_at(hit, n - i))
            return 1;
    }
    return 0;
}

typedef struct {
    int kind;
    const unsigned char *assoc;
    Py_ssize_t assoc_len;
    PyObject *mask; /* borrowed (the columns tuple is held): called on the plaintext, or NULL */
    int text_mask;  /* a TEXT_MASK_* code: applied here rather than by mask; 0 for none */
    const unsigned char *fixed; /* borrowed: the fixed mask's canonical bytes */
    Py_ssize_t fixed_len;
} Column;

/* The text masks of proxy/policy/masks.py (its NATIVE_* codes), applied to the decrypted UTF-8 bytes byte
 * for byte as its functions do on text and varchar(n) (see masks.native_form for which apply where). */
enum { TEXT_MASK_NONE = 0, TEXT_MASK_PARTIAL = 1, TEXT_MASK_LAST4 = 2, TEXT_MASK_EMAIL = 3,
       TEXT_MASK_FIXED = 4, TEXT_MASK_NULL = 5, TEXT_MASK_LAST = 5 };
enum { MASKED_OK = 0, MASKED_CALL = 1, MASKED_TOO_LONG = 2 };

/* The number of code points of buf[0:len] if it is strict UTF-8 as Python's bytes.decode("utf-8") reads it
 * (no overlong forms, no surrogates, nothing above U+10FFFF), else -1. */
static Py_ssize_t
utf8_chars(const unsigned char *buf, Py_ssize_t len)
{
    Py_ssize_t chars = 0, i = 0;
    while (i < len) {
        unsigned char b = buf[i];
        Py_ssize_t need;
        unsigned char lo = 0x80, hi = 0xbf; /* the range of the second byte */
        if (b < 0x80) {
            i++;
            chars++;
            continue;
        } else if (b >= 0xc2 && b <= 0xdf) {
            need = 1;
        } else if (b >= 0xe0 && b <= 0xef) {
            need = 2;
            if (b == 0xe0)
                lo = 0xa0;
            else if (b == 0xed)
                hi = 0x9f;
        } else if (b >= 0xf0 && b <= 0xf4) {
            need = 3;
            if (b == 0xf0)
                lo = 0x90;
            else if (b == 0xf4)
                hi = 0x8f;
        } else {
            return -1;
        }
        if (need > len - i - 1)
            return -1;
        if (buf[i + 1] < lo || buf[i + 1] > hi)
            return -1;
        for (Py_ssize_t k = 2; k <= need; k++)
            if ((buf[i + k] & 0xc0) != 0x80)
                return -1;
        i += need + 1;
        chars++;
    }
    return chars;
}

/* The byte offset where the last `count` code points of valid UTF-8 buf[0:len] start (count <= chars). */
static Py_ssize_t
utf8_tail(const unsigned char *buf, Py_ssize_t len, Py_ssize_t count)
{
    Py_ssize_t i = len;
    while (count > 0 && i > 0) {
        i--;
        while (i > 0 && (buf[i] & 0xc0) == 0x80)
            i--;
        count--;
    }
    return i;
}

/* Applies col's text mask to the plaintext buf[0:plain] in place. room is how many bytes buf may hold,
 * stored the length of the stored value the result replaces (a result longer than it: MASKED_TOO_LONG, as
 * the callback path answers). *mlen is the result's length, -1 for NULL. MASKED_CALL: the value is not
 * valid UTF-8 where the mask needs its characters; the Python function is to decide (it raises). buf is
 * left unchanged unless MASKED_OK, bytes past the result cleansed. */
static int
apply_text_mask(const Column *col, unsigned char *buf, Py_ssize_t plain, Py_ssize_t room, Py_ssize_t stored,
                Py_ssize_t *mlen)
{
    Py_ssize_t chars = plain, out = 0;
    switch (col->text_mask) {
    case TEXT_MASK_NULL:
        *mlen = -1;
        OPENSSL_cleanse(buf, (size_t)plain);
        return MASKED_OK;
    case TEXT_MASK_FIXED:
        if (col->fixed_len > stored || col->fixed_len > room)
            return MASKED_TOO_LONG;
        OPENSSL_cleanse(buf, (size_t)plain);
        memcpy(buf, col->fixed, (size_t)col->fixed_len);
        *mlen = col->fixed_len;
        return MASKED_OK;
    case TEXT_MASK_PARTIAL:
    case TEXT_MASK_LAST4: {
        int ascii = 1;
        for (Py_ssize_t i = 0; i < plain; i++)
            if (buf[i] >= 0x80) {
                ascii = 0;
                break;
            }
        if (!ascii) {
            chars = utf8_chars(buf, plain);
            if (chars < 0)
                return MASKED_CALL;
        }
        Py_ssize_t keep = col->text_mask == TEXT_MASK_PARTIAL ? 2 : 4;
        if (chars <= keep) {
            out = chars; /* all stars: one per character, never more bytes than the value has */
            if (out > plain || out > room)
                return MASKED_TOO_LONG;
            OPENSSL_cleanse(buf, (size_t)plain);
            memset(buf, '*', (size_t)out);
            *mlen = out;
            return MASKED_OK;
        }
        Py_ssize_t stars = chars - keep;
        if (col->text_mask == TEXT_MASK_PARTIAL) {
            Py_ssize_t first = utf8_tail(buf, plain, chars - 1); /* the first character's length */
            Py_ssize_t last = utf8_tail(buf, plain, 1);
            Py_ssize_t last_len = plain - last;
            out = first + stars + last_len;
            if (first < 1 || last < first || out > plain || out > room)
                return MASKED_TOO_LONG; /* cannot be for valid UTF-8; explicit all the same */
            memmove(buf + first + stars, buf + last, (size_t)last_len);
            memset(buf + first, '*', (size_t)stars);
        } else {
            Py_ssize_t tail = utf8_tail(buf, plain, 4);
            Py_ssize_t tail_len = plain - tail;
            out = stars + tail_len;
            if (tail < stars || out > plain || out > room)
                return MASKED_TOO_LONG; /* cannot be for valid UTF-8; explicit all the same */
            memmove(buf + stars, buf + tail, (size_t)tail_len);
            memset(buf, '*', (size_t)stars);
        }
        if (out < plain)
            OPENSSL_cleanse(buf + out, (size_t)(plain - out));
        *mlen = out;
        return MASKED_OK;
    }
    case TEXT_MASK_EMAIL: {
        Py_ssize_t at = plain - 1;
        while (at >= 0 && buf[at] != '@')
            at--;
        Py_ssize_t domain = at < 0 ? 0 : plain - at; /* "@example.com", or nothing */
        out = 4 + domain;
        if (out > stored || out > room)
            return MASKED_TOO_LONG;
        if (at >= 0)
            memmove(buf + 4, buf + at, (size_t)domain);
        else
            OPENSSL_cleanse(buf, (size_t)plain);
        if (at > 4 || (at < 0 && plain > 4))
            OPENSSL_cleanse(buf + out, (size_t)(plain - out));
        memcpy(buf, "****", 4);
        *mlen = out;
        return MASKED_OK;
    }
    default:
        return MASKED_CALL;
    }
}

/* Hex digit values, -1 for anything else (binascii.a2b_hex accepts both cases, so does this). */
static signed char HEX[256];

static void
init_hex(void)
{
    memset(HEX, -1, sizeof(HEX));
    for (int i = 0; i < 10; i++)
        HEX['0' + i] = (signed char)i;
    for (int i = 0; i < 6; i++) {
        HEX['a' + i] = (signed char)(10 + i);
        HEX['A' + i] = (signed char)(10 + i);
    }
}

static PyObject *
row_refused(const char *reason, Py_ssize_t column)
{
    PyObject *args = Py_BuildValue("(sn)", reason, column);
    if (args != NULL) {
        PyErr_SetObject(RowRefused, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *
row_refused_obj(PyObject *reason, Py_ssize_t column)
{
    PyObject *args = Py_BuildValue("(On)", reason, column);
    if (args != NULL) {
        PyErr_SetObject(RowRefused, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *
malformed(const char *what)
{
    PyErr_SetString(Malformed, what);
    return NULL;
}

/* -- per-subject keys: the subject check of the DataRow kernel ------------------------------------------ */

/* A value of a column with per-subject keys whose row's subject column is in the same result is checked
 * before the row's values are opened: the key its envelope names must be the key of the subject the row
 * names, or the value was moved into another subject's row (refused as "authentication", as a tampered
 * one). proxy/encrypt/rows.py _check_subjects is the reference, check for check and in the same order.
 *
 * What is compared: a subject's Key holds its subject's part of the associated data (suffix: 0x00 . u16
 * length . kind . u32 length . canonical id, keymgmt.envelope.subject_associated_data); the check holds
 * the table's kind part (0x00 . u16 length . kind) and the row's subject id is made canonical here
 * (proxy/encrypt/subjects.py), so that each value costs a key lookup in the Opener's table (which the
 * open needs anyway) and a comparison of bytes. Forms of a text id that are not already canonical (which
 * PostgreSQL's output functions never write: "007", " 5", an upper-case uuid) go to the caller's
 * canonicaliser, the reference function itself. */

enum { SUBJECT_NONE = 0, SUBJECT_INTEGER = 1, SUBJECT_UUID = 2, SUBJECT_TEXT = 3, SUBJECT_LAST = 3 };

/* keymgmt.envelope.MAX_SUBJECT_ID_LENGTH: the longest subject id (exported as SUBJECT_CHECKS; rows.py uses
 * the checks only when the two agree). */
#define MAX_SUBJECT_ID 120
/* Room for a canonical id: the longest a Key's suffix can name (a longer id matches no Key). */
#define CANONICAL_ROOM MAX_SUBJECT_SUFFIX

typedef struct {
    Py_ssize_t column;     /* the checked column (a decrypted one) */
    Py_ssize_t subject_at; /* the row's subject column */
    int type_class;        /* SUBJECT_*: the subject column's type class */
    int binary;            /* the server sends the subject column in binary */
    int column_binary;     /* the server sends the checked column's envelope raw (else bytea hex text) */
    const unsigned char *kind_part; /* borrowed (the checks tuple is held): 0x00 . u16 length . kind */
    Py_ssize_t kind_part_len;
    PyObject *canonical;   /* borrowed: canonical(text id: bytes) -> canonical id bytes, or None */
} SubjectCheck;

/* Whether s[0:n] is an integer's text exactly as str(int) writes it, in bigint's range: an optional '-',
 * then 1 to 19 digits without a leading zero ("0" alone; "-0" is not canonical). */
static int
canonical_integer_text(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = (n > 0 && s[0] == '-') ? 1 : 0;
    Py_ssize_t digits = n - i;
    if (digits < 1 || digits > 19)
        return 0;
    if (s[i] == '0')
        return digits == 1 && i == 0;
    for (Py_ssize_t k = i; k < n; k++)
        if (s[k] < '0' || s[k] > '9')
            return 0;
    if (digits == 19)
        return memcmp(s + i, i ? "9223372036854775808" : "9223372036854775807", 19) <= 0;
    return 1;
}

/* Whether s[0:n] is a uuid as str(uuid.UUID) writes it: 36 characters, lower-case hex, hyphens at 8, 13,
 * 18 and 23. */
static int
canonical_uuid_text(const unsigned char *s, Py_ssize_t n)
{
    if (n != 36)
        return 0;
    for (Py_ssize_t i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return 0;
        } else if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) {
            return 0;
        }
    }
    return 1;
}

/* The canonical id of the subject id raw[0:n] (proxy/encrypt/subjects.py subject_from_text and
 * subject_from_binary) into out[0:CANONICAL_ROOM]: its length, -2 when it is no id of the column's type
 * (or longer than out: it matches no Key either), -1 with an exception set (the canonicaliser raised). */
static Py_ssize_t
subject_canonical(const SubjectCheck *chk, const unsigned char *raw, Py_ssize_t n, unsigned char *out)
{
    static const char digits[] = "0123456789abcdef";
    switch (chk->type_class) {
    case SUBJECT_INTEGER:
        if (chk->binary) {
            int64_t value;
            if (n == 2)
                value = (int16_t)(((uint16_t)raw[0] << 8) | raw[1]);
            else if (n == 4)
                value = (int32_t)be32(raw);
            else if (n == 8)
                value = (int64_t)(((uint64_t)be32(raw) << 32) | be32(raw + 4));
            else
                return -2;
            /* Decimal, the magnitude as unsigned so that INT64_MIN needs no special case. */
            uint64_t magnitude = value < 0 ? (uint64_t)0 - (uint64_t)value : (uint64_t)value;
            unsigned char reversed[20];
            Py_ssize_t len = 0, w = 0;
            do {
                reversed[len++] = (unsigned char)('0' + (int)(magnitude % 10));
                magnitude /= 10;
            } while (magnitude > 0 && len < (Py_ssize_t)sizeof(reversed));
            if (value < 0)
                out[w++] = '-';
            while (len > 0)
                out[w++] = reversed[--len];
            return w;
        }
        if (canonical_integer_text(raw, n)) {
            memcpy(out, raw, (size_t)n);
            return n;
        }
        break; /* the canonicaliser decides */
    case SUBJECT_UUID:
        if (chk->binary) {
            if (n != 16)
                return -2;
            Py_ssize_t w = 0;
            for (Py_ssize_t i = 0; i < 16; i++) {
                if (i == 4 || i == 6 || i == 8 || i == 10)
                    out[w++] = '-';
                out[w++] = (unsigned char)digits[raw[i] >> 4];
                out[w++] = (unsigned char)digits[raw[i] & 0x0f];
            }
            return w; /* 36 */
        }
        if (canonical_uuid_text(raw, n)) {
            memcpy(out, raw, (size_t)n);
            return n;
        }
        break;
    case SUBJECT_TEXT:
        /* In either format: its bytes, strict UTF-8 without NUL, at most MAX_SUBJECT_ID bytes. */
        if (n > MAX_SUBJECT_ID || memchr(raw, 0, (size_t)n) != NULL || utf8_chars(raw, n) < 0)
            return -2;
        memcpy(out, raw, (size_t)n);
        return n;
    default:
        return -2; /* no subject column type known (catalog not read): no id is valid */
    }
    PyObject *arg = PyBytes_FromStringAndSize((const char *)raw, n);
    if (arg == NULL)
        return -1;
    PyObject *got = PyObject_CallOneArg(chk->canonical, arg);
    Py_DECREF(arg);
    if (got == NULL)
        return -1;
    Py_ssize_t len = -2;
    if (PyBytes_Check(got)) {
        if (PyBytes_GET_SIZE(got) <= CANONICAL_ROOM) {
            len = PyBytes_GET_SIZE(got);
            memcpy(out, PyBytes_AS_STRING(got), (size_t)len);
        }
    } else if (got != Py_None) {
        Py_DECREF(got);
        PyErr_SetString(PyExc_TypeError, "a subject canonicaliser returns bytes or None");
        return -1;
    }
    Py_DECREF(got);
    return len;
}

/* Whether key's subject part is chk's kind with the canonical id id[0:idlen]. */
static int
key_names_subject(const KeyObject *key, const SubjectCheck *chk, const unsigned char *id, Py_ssize_t idlen)
{
    Py_ssize_t kp = chk->kind_part_len;
    if (idlen < 0 || key->suffix_len != kp + 4 + idlen)
        return 0;
    const unsigned char *s = key->suffix;
    return memcmp(s, chk->kind_part, (size_t)kp) == 0 && be32(s + kp) == (uint32_t)idlen &&
           memcmp(s + kp + 4, id, (size_t)idlen) == 0;
}

/* Parses the checks argument of rewrite_rows: a tuple of (column, subject_at, type class, subject column
 * in binary, kind part: bytes, canonical: callable), each column a decrypted one of columns[0:ncols].
 * Returns a PyMem array (NULL with *count 0 for none), or NULL with an exception set. */
static SubjectCheck *
parse_subject_checks(PyObject *obj, const Column *columns, Py_ssize_t ncols, Py_ssize_t *count)
{
    *count = 0;
    if (!PyTuple_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "checks must be a tuple");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(obj);
    if (n == 0)
        return NULL;
    SubjectCheck *checks = PyMem_Calloc((size_t)n, sizeof(SubjectCheck));
    if (checks == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyTuple_GET_ITEM(obj, k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 6 || !PyLong_Check(PyTuple_GET_ITEM(item, 0)) ||
            !PyLong_Check(PyTuple_GET_ITEM(item, 1)) || !PyLong_Check(PyTuple_GET_ITEM(item, 2)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 4)) || !PyCallable_Check(PyTuple_GET_ITEM(item, 5))) {
            PyErr_SetString(PyExc_TypeError, "a subject check is (column, subject_at, type class, binary, "
                                             "kind part: bytes, canonical: callable)");
            goto fail;
        }
        SubjectCheck *chk = &checks[k];
        chk->column = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 0));
        if (chk->column == -1 && PyErr_Occurred())
            goto fail;
        chk->subject_at = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
        if (chk->subject_at == -1 && PyErr_Occurred())
            goto fail;
        long cls = PyLong_AsLong(PyTuple_GET_ITEM(item, 2));
        if (cls == -1 && PyErr_Occurred())
            goto fail;
        int binary = PyObject_IsTrue(PyTuple_GET_ITEM(item, 3));
        if (binary < 0)
            goto fail;
        chk->binary = binary;
        chk->kind_part = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 4));
        chk->kind_part_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 4));
        chk->canonical = PyTuple_GET_ITEM(item, 5);
        if (chk->column < 0 || chk->column >= ncols ||
            (columns[chk->column].kind != COLUMN_BINARY && columns[chk->column].kind != COLUMN_HEX) ||
            chk->subject_at < 0 ||
            chk->subject_at >= ncols || cls < SUBJECT_NONE || cls > SUBJECT_LAST ||
            chk->kind_part_len > MAX_SUBJECT_SUFFIX - 4) {
            PyErr_SetString(PyExc_ValueError, "a subject check names a column that is not decrypted, a subject "
                                              "column out of the row, an unknown type class or a kind too long");
            goto fail;
        }
        chk->type_class = (int)cls;
        chk->column_binary = columns[chk->column].kind == COLUMN_BINARY;
    }
    *count = n;
    return checks;
fail:
    PyMem_Free(checks);
    return NULL;
}

/*
 * The subject checks of the row data[pos:row_end] (its type, length and column count already checked).
 * voff and vlen have room for ncols entries. 0: every checked value may be opened; -1 with an exception
 * set: RowRefused("authentication", column) for a value whose key is another subject's than its row's,
 * Unsupported for a checked value in escape-format bytea text (the Python kernel checks those), or find's
 * own exception (a key not in memory: nothing has been written, the run can be retried).
 *
 * In the order of the reference: the row's values are located first, and a row whose lengths do not fit
 * it exactly is not checked (the kernel then refuses it). Then per check, in order: a NULL value, a value
 * that does not start like an envelope (raw: 48 bytes or more and the v1 prefix; hex text: \x, an even
 * number of at least 96 digits, the first 40 valid and decoding to the v1 prefix and a key id), a key the
 * Opener does not give (unknown, disabled: the open refuses it), or a column's key are not checked; a
 * subject's key must name the kind of the table and the canonical id of the row's subject column (NULL,
 * or no id of its type, names none).
 */
static int
check_row_subjects(OpenerObject *opener, const unsigned char *d, Py_ssize_t pos, Py_ssize_t row_end,
                   Py_ssize_t ncols, const SubjectCheck *checks, Py_ssize_t nchecks, Py_ssize_t *voff, int32_t *vlen)
{
    Py_ssize_t p = pos + 7;
    for (Py_ssize_t c = 0; c < ncols; c++) {
        if (row_end - p < 4)
            return 0;
        int32_t n = (int32_t)be32(d + p);
        Py_ssize_t size = n > 0 ? (Py_ssize_t)n : 0;
        if (size > row_end - p - 4)
            return 0;
        voff[c] = p + 4;
        vlen[c] = n;
        p += 4 + size;
    }
    if (p != row_end)
        return 0;
    /* The last canonical id made for this row, reused by the checks that read the same subject column the
     * same way (a table's encrypted columns all do). */
    const SubjectCheck *made_for = NULL;
    unsigned char id[CANONICAL_ROOM];
    Py_ssize_t idlen = -2;
    for (Py_ssize_t k = 0; k < nchecks; k++) {
        const SubjectCheck *chk = &checks[k];
        int32_t n = vlen[chk->column];
        if (n < 0)
            continue;
        const unsigned char *v = d + voff[chk->column];
        unsigned char prefix[KEY_END];
        if (chk->column_binary) {
            if (n < MIN_LENGTH || memcmp(v, PREFIX_V1, PREFIX_LENGTH) != 0)
                continue;
            memcpy(prefix, v, KEY_END);
        } else {
            if (n < 2 || v[0] != '\\' || v[1] != 'x') {
                PyErr_SetString(Unsupported, "escape-format bytea");
                return -1;
            }
            if ((n - 2) % 2 != 0 || (n - 2) / 2 < MIN_LENGTH)
                continue;
            int bad = 0;
            for (int i = 0; i < KEY_END; i++) {
                int hi = HEX[v[2 + 2 * i]], lo = HEX[v[3 + 2 * i]];
                bad |= hi | lo;
                prefix[i] = (unsigned char)(((unsigned)hi << 4) | ((unsigned)lo & 0x0fu));
            }
            if (bad < 0 || memcmp(prefix, PREFIX_V1, PREFIX_LENGTH) != 0)
                continue;
        }
        PyObject *reason = NULL;
        KeyObject *key = opener_key(opener, prefix, &reason);
        if (key == NULL) {
            if (reason == NULL)
                return -1;
            Py_DECREF(reason); /* refused keys are the open's to report */
            continue;
        }
        if (key->suffix_len == 0)
            continue; /* a column's key (a value written before the table had subject keys) */
        Py_INCREF(key); /* held across the canonicaliser, which runs Python code */
        if (made_for == NULL || made_for->subject_at != chk->subject_at || made_for->type_class != chk->type_class ||
            made_for->binary != chk->binary || made_for->canonical != chk->canonical) {
            int32_t sn = vlen[chk->subject_at];
            idlen = sn < 0 ? -2 : subject_canonical(chk, d + voff[chk->subject_at], (Py_ssize_t)sn, id);
            if (idlen == -1) {
                Py_DECREF(key);
                return -1;
            }
            made_for = chk;
        }
        int same = key_names_subject(key, chk, id, idlen);
        Py_DECREF(key);
        if (!same) {
            row_refused("authentication", chk->column);
            return -1;
        }
    }
    return 0;
}

/*
 * rewrite_rows(data, start, end, columns, opener) -> bytes
 *
 * data[start:end] is a run of complete DataRow messages; columns has one entry per column of the row
 * description: None (copied as it is), False (sent as NULL, never read: a hidden column), True (screened:
 * NULL if the value carries an envelope, see carries_envelope, else copied), 2 (the same for a bytea, whose
 * envelope can only be the whole value) or
 * (associated, server_binary[, mask[, text mask code, fixed bytes]]): with a code (see apply_text_mask) the
 * mask is applied here, mask called only for a value that is not UTF-8. Every protected value is opened and replaced by its plaintext,
 * or by what mask (a callable: plaintext bytes -> bytes, or None for NULL) makes of it (the client's bytes: the caller only passes plans whose columns are
 * identity). Mirrors proxy/encrypt/rows.py's loops, check for check and in the same order, so that the
 * first fault of a run gives the same error: Malformed for framing, RowRefused(reason, column index, or
 * -1 for "the plan's first protected column") for a value or row that cannot be delivered, Unsupported
 * for escape-format bytea, and find's own exception as it is. Nothing is returned for a failing run.
 *
 * checks (optional, a tuple, see parse_subject_checks): the subject checks of columns with per-subject
 * keys, made for each row once its column count is checked and before any of its values is opened (see
 * check_row_subjects).
 */
static PyObject *
rewrite_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "rewrite_rows(data, start, end, columns, opener[, checks])");
        return NULL;
    }
    PyObject *data = args[0], *columns_obj = args[3];
    if (!PyBytes_Check(data))
        return PyErr_Format(PyExc_TypeError, "data must be bytes");
    if (!PyTuple_Check(columns_obj))
        return PyErr_Format(PyExc_TypeError, "columns must be a tuple");
    if (!PyObject_TypeCheck(args[4], &OpenerType))
        return PyErr_Format(PyExc_TypeError, "opener must be a pgveil_accel.Opener");
    OpenerObject *opener = (OpenerObject *)args[4];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (start < 0 || start > end || end > len)
        return PyErr_Format(PyExc_ValueError, "start and end must lie in data");
    Py_ssize_t ncols = PyTuple_GET_SIZE(columns_obj);
    if (ncols > 0x7fff)
        return PyErr_Format(PyExc_ValueError, "too many columns");

    Column *columns = PyMem_Calloc(ncols > 0 ? (size_t)ncols : 1, sizeof(Column));
    if (columns == NULL)
        return PyErr_NoMemory();
    Py_INCREF(columns_obj); /* keeps the associated bytes alive whatever find does */
    PyObject *out = NULL, *reason = NULL;
    PyObject *checks_obj = nargs == 6 ? args[5] : Py_None;
    Py_INCREF(checks_obj); /* keeps the kind parts and canonicalisers alive, as columns_obj */
    SubjectCheck *checks = NULL;
    Py_ssize_t nchecks = 0;
    Py_ssize_t *voff = NULL; /* a checked row's value offsets and lengths */
    int32_t *vlen = NULL;
    unsigned char *scratch = NULL; /* hex-decoded envelopes */
    Py_ssize_t scratch_cap = 0;
    for (Py_ssize_t c = 0; c < ncols; c++) {
        PyObject *item = PyTuple_GET_ITEM(columns_obj, c);
        if (item == Py_None)
            continue;
        if (item == Py_False) {
            columns[c].kind = COLUMN_NULL;
            continue;
        }
        if (item == Py_True) {
            columns[c].kind = COLUMN_SCREEN;
            continue;
        }
        if (PyLong_CheckExact(item)) {
            if (PyLong_AsLong(item) != 2) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "a screened column is True, or 2 for a bytea");
                goto fail;
            }
            columns[c].kind = COLUMN_SCREEN_WHOLE;
            continue;
        }
        Py_ssize_t arity = PyTuple_Check(item) ? PyTuple_GET_SIZE(item) : 0;
        if (arity < 2 || arity > 5 || arity == 4 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError, "a column is None, False or (associated: bytes, server_binary: "
                                             "bool[, mask[, text mask code: int, fixed: bytes]])");
            goto fail;
        }
        if (arity == 5) {
            long code = PyLong_Check(PyTuple_GET_ITEM(item, 3)) ? PyLong_AsLong(PyTuple_GET_ITEM(item, 3)) : -1;
            if (code == -1 && PyErr_Occurred())
                goto fail;
            if (code <= TEXT_MASK_NONE || code > TEXT_MASK_LAST || !PyBytes_Check(PyTuple_GET_ITEM(item, 4))) {
                PyErr_SetString(PyExc_TypeError, "a text mask is a known code and its fixed bytes");
                goto fail;
            }
            columns[c].text_mask = (int)code;
            columns[c].fixed = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 4));
            columns[c].fixed_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 4));
        }
        if (arity >= 3) {
            if (!PyCallable_Check(PyTuple_GET_ITEM(item, 2))) {
                PyErr_SetString(PyExc_TypeError, "a column's mask must be callable");
                goto fail;
            }
            columns[c].mask = PyTuple_GET_ITEM(item, 2);
        }
        int binary = PyObject_IsTrue(PyTuple_GET_ITEM(item, 1));
        if (binary < 0)
            goto fail;
        columns[c].kind = binary ? COLUMN_BINARY : COLUMN_HEX;
        columns[c].assoc = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 0));
        columns[c].assoc_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
    }

    if (checks_obj != Py_None) {
        checks = parse_subject_checks(checks_obj, columns, ncols, &nchecks);
        if (checks == NULL && PyErr_Occurred())
            goto fail;
        if (nchecks > 0) {
            voff = PyMem_Calloc((size_t)ncols, sizeof(Py_ssize_t));
            vlen = PyMem_Calloc((size_t)ncols, sizeof(int32_t));
            if (voff == NULL || vlen == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
        }
    }

    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t cap = end - start; /* every rewrite shrinks its value: the output never outgrows the input */
    out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL)
        goto fail;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    Py_ssize_t w = 0;
    int changed = 0;
    Py_ssize_t pos = start;
#define ROOM(nbytes)                                                                        \
    do {                                                                                    \
        if ((nbytes) < 0 || (nbytes) > cap - w) {                                           \
            PyErr_SetString(PyExc_SystemError, "pgveil_accel: output would outgrow input"); \
            goto fail;                                                                      \
        }                                                                                   \
    } while (0)

    while (pos < end) {
        if (end - pos < 7) {
            malformed("not a complete DataRow");
            goto fail;
        }
        uint32_t ln = be32(d + pos + 1);
        int16_t count = (int16_t)(((uint16_t)d[pos + 5] << 8) | d[pos + 6]);
        if (d[pos] != 'D' || ln < 6 || (Py_ssize_t)ln > end - pos - 1) {
            malformed("not a complete DataRow");
            goto fail;
        }
        Py_ssize_t row_end = pos + 1 + (Py_ssize_t)ln;
        if (count != ncols) {
            row_refused("row_shape", -1);
            goto fail;
        }
        if (nchecks > 0 && check_row_subjects(opener, d, pos, row_end, ncols, checks, nchecks, voff, vlen) < 0)
            goto fail;
        Py_ssize_t row_w = w;
        ROOM(7);
        memcpy(o + w, d + pos, 7); /* type, length (patched below), count */
        w += 7;
        Py_ssize_t p = pos + 7;
        for (Py_ssize_t c = 0; c < ncols; c++) {
            if (row_end - p < 4) {
                /* A length field past the row's end: whatever the bytes after it, the reference ends
                 * in a malformed message (see rows._misfit). */
                malformed("a length runs past the end of its row");
                goto fail;
            }
            int32_t n = (int32_t)be32(d + p);
            const Column *col = &columns[c];
            if (col->kind == COLUMN_COPIED || n < 0) {
                Py_ssize_t size = 4 + (n > 0 ? (Py_ssize_t)n : 0);
                if (size > row_end - p) {
                    /* The value runs past the row: the next length would be read past it (malformed),
                     * or, for the last column, the row does not end where its values do. */
                    if (c + 1 < ncols)
                        malformed("a length runs past the end of its row");
                    else
                        row_refused("row_shape", -1);
                    goto fail;
                }
                ROOM(size);
                memcpy(o + w, d + p, (size_t)size);
                w += size;
                p += size;
                continue;
            }
            Py_ssize_t v = p + 4;
            if ((Py_ssize_t)n > row_end - v) {
                malformed("a value runs past the end of its row");
                goto fail;
            }
            if (col->kind == COLUMN_SCREEN || col->kind == COLUMN_SCREEN_WHOLE) {
                if (!carries_envelope(d + v, n, col->kind == COLUMN_SCREEN_WHOLE)) {
                    ROOM(4 + (Py_ssize_t)n);
                    memcpy(o + w, d + p, (size_t)(4 + n)); /* copied as it is */
                    w += 4 + n;
                    p = v + n;
                    continue;
                }
                ROOM(4);
                put_be32(o + w, 0xffffffffu); /* carries an envelope: NULL */
                w += 4;
                p = v + n;
                changed = 1;
                continue;
            }
            if (col->kind == COLUMN_NULL) {
                ROOM(4);
                put_be32(o + w, 0xffffffffu); /* NULL: length -1, no bytes */
                w += 4;
                p = v + n;
                changed = 1;
                continue;
            }
            const unsigned char *env = d + v;
            Py_ssize_t size = n;
            if (col->kind == COLUMN_HEX) {
                /* bytea text output: \x and two hex digits per byte (PostgreSQL docs, "Binary Data
                 * Types"); escape format goes back to the Python kernel. */
                if (n < 2 || env[0] != '\\' || env[1] != 'x') {
                    PyErr_SetString(Unsupported, "escape-format bytea");
                    goto fail;
                }
                if ((n - 2) % 2 != 0) {
                    row_refused("not_an_envelope", c);
                    goto fail;
                }
                size = (n - 2) / 2;
                if (size > scratch_cap) {
                    unsigned char *grown = PyMem_Realloc(scratch, (size_t)size);
                    if (grown == NULL) {
                        PyErr_NoMemory();
                        goto fail;
                    }
                    scratch = grown;
                    scratch_cap = size;
                }
                const unsigned char *hex = env + 2;
                int bad = 0;
                for (Py_ssize_t i = 0; i < size; i++) {
                    int hi = HEX[hex[2 * i]], lo = HEX[hex[2 * i + 1]];
                    bad |= hi | lo; /* negative if either is not a hex digit */
                    scratch[i] = (unsigned char)(((unsigned)hi << 4) | ((unsigned)lo & 0x0fu));
                }
                if (bad < 0) {
                    row_refused("not_an_envelope", c);
                    goto fail;
                }
                env = scratch;
            }
            Py_ssize_t plain = size - MIN_LENGTH; /* checked >= 0 by opener_open before use */
            ROOM(4 + (plain > 0 ? plain : 0));
            int r = opener_open(opener, env, size, col->assoc, col->assoc_len, o + w + 4, &reason);
            if (r < 0)
                goto fail;
            if (r > 0) {
                row_refused_obj(reason, c);
                goto fail;
            }
            if (col->text_mask != TEXT_MASK_NONE) {
                Py_ssize_t mlen = -1;
                int m = apply_text_mask(col, o + w + 4, plain, cap - w - 4, (Py_ssize_t)n, &mlen);
                if (m == MASKED_TOO_LONG) {
                    OPENSSL_cleanse(o + w + 4, (size_t)plain);
                    PyErr_SetString(Unsupported, "a masked value longer than its envelope");
                    goto fail;
                }
                if (m == MASKED_OK) {
                    if (mlen < 0) {
                        put_be32(o + w, 0xffffffffu);
                        w += 4;
                    } else {
                        ROOM(4 + mlen);
                        put_be32(o + w, (uint32_t)mlen);
                        w += 4 + mlen;
                    }
                    p = v + n;
                    changed = 1;
                    continue;
                }
                /* MASKED_CALL: the Python function below */
            }
            if (col->mask != NULL) {
                PyObject *value = PyBytes_FromStringAndSize((const char *)(o + w + 4), plain);
                if (value == NULL)
                    goto fail;
                OPENSSL_cleanse(o + w + 4, (size_t)plain); /* the plaintext is not what the client gets */
                PyObject *masked = PyObject_CallOneArg(col->mask, value);
                Py_DECREF(value);
                if (masked == NULL)
                    goto fail;
                if (masked == Py_None) {
                    Py_DECREF(masked);
                    put_be32(o + w, 0xffffffffu);
                    w += 4;
                } else {
                    if (!PyBytes_Check(masked)) {
                        Py_DECREF(masked);
                        PyErr_SetString(PyExc_TypeError, "a mask returns bytes or None");
                        goto fail;
                    }
                    Py_ssize_t mlen = PyBytes_GET_SIZE(masked);
                    if (mlen > (Py_ssize_t)n) {
                        /* A mask longer than the stored value it replaces (a short value's hash, say):
                         * the output could outgrow the input, which only the Python kernel allows. */
                        Py_DECREF(masked);
                        PyErr_SetString(Unsupported, "a masked value longer than its envelope");
                        goto fail;
                    }
                    put_be32(o + w, (uint32_t)mlen);
                    memcpy(o + w + 4, PyBytes_AS_STRING(masked), (size_t)mlen);
                    w += 4 + mlen;
                    Py_DECREF(masked);
                }
                p = v + n;
                changed = 1;
                continue;
            }
            put_be32(o + w, (uint32_t)plain);
            w += 4 + plain;
            p = v + n;
            changed = 1;
        }
        if (p != row_end) {
            row_refused("row_shape", -1);
            goto fail;
        }
        put_be32(o + row_w + 1, (uint32_t)(w - row_w - 1));
        pos = row_end;
    }
#undef ROOM
    PyMem_Free(columns);
    PyMem_Free(scratch);
    PyMem_Free(checks);
    PyMem_Free(voff);
    PyMem_Free(vlen);
    Py_DECREF(columns_obj);
    Py_DECREF(checks_obj);
    if (!changed) {
        Py_DECREF(out);
        return PySequence_GetSlice(data, start, end); /* the same object when the run is all of data */
    }
    if (w < cap && _PyBytes_Resize(&out, w) < 0)
        return NULL;
    return out;

fail:
    Py_XDECREF(reason);
    Py_XDECREF(out);
    PyMem_Free(columns);
    PyMem_Free(scratch);
    PyMem_Free(checks);
    PyMem_Free(voff);
    PyMem_Free(vlen);
    Py_DECREF(columns_obj);
    Py_DECREF(checks_obj);
    return NULL;
}

/*
 * data_row_run(data, end, n) -> (end, count): the run of complete DataRow messages that starts with the
 * one ending at end, within data[:n] (the relay's scan, proxy/protocol/relay.py _data_row_run).
 */
static PyObject *
data_row_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "data_row_run(data, end, n)");
        return NULL;
    }
    if (!PyBytes_Check(args[0]))
        return PyErr_Format(PyExc_TypeError, "data must be bytes");
    Py_ssize_t end = PyLong_AsSsize_t(args[1]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (end < 0 || n < 0 || n > PyBytes_GET_SIZE(args[0]))
        return PyErr_Format(PyExc_ValueError, "end and n must lie in data");
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t rows = 1;
    while (n - end >= 5) {
        uint32_t ln = be32(d + end + 1);
        if (d[end] != 'D' || ln < 4 || (Py_ssize_t)ln > n - end - 1)
            break;
        end += 1 + (Py_ssize_t)ln;
        rows++;
    }
    return Py_BuildValue("(nn)", end, rows);
}

/* -- Bind rewrite: a prepared statement's protected parameters sealed in one call per Bind ------------- */

/*
 * Bind (PostgreSQL docs, "Message Formats"): String portal . String statement . Int16 n . Int16[n]
 * parameter format codes . Int16 n . n * (Int32 length (-1: NULL, no bytes) . Byte[length]) . Int16 n .
 * Int16[n] result format codes. The reference is proxy/encrypt/engine.py (SessionCrypto._seal_params,
 * then proxy/protocol/codec.py encode_bind_frame), and proxy/protocol/codec.py _bind_frame for what a
 * well-formed body is; proxy/encrypt/bindseal.py compiles the plan and keeps the Python path the fallback.
 */

typedef struct {
    Py_ssize_t index;          /* 0-based parameter number */
    KeyObject *key;            /* borrowed from the keys tuple, which the caller holds for the call */
    const unsigned char *prefix;
    int binary_ok;             /* a binary value is the column's canonical bytes if it is valid text */
    Py_ssize_t max_chars;      /* varchar(N): N; -1: no limit */
    const unsigned char *aad;  /* the column's associated data (borrowed from the targets tuple) */
    Py_ssize_t aad_len;
} BindTarget;

static inline Py_ssize_t
bind_u16(const unsigned char *p)
{
    return ((Py_ssize_t)p[0] << 8) | (Py_ssize_t)p[1];
}

/* 1 when s[0:n] is valid UTF-8 (exactly what Python's strict decoder accepts: no overlong forms, no
 * surrogates, nothing above U+10FFFF, no truncated sequence) without a NUL, with its count of code points
 * in *chars; 0 otherwise. Every read is at an index below n. */
static int
utf8_text(const unsigned char *s, Py_ssize_t n, Py_ssize_t *chars)
{
    Py_ssize_t i = 0, count = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            if (c == 0)
                return 0;
            i++;
            count++;
            continue;
        }
        Py_ssize_t more;
        unsigned char lo = 0x80, hi = 0xBF; /* the range of the byte after the lead byte */
        if (c >= 0xC2 && c <= 0xDF)
            more = 1;
        else if (c == 0xE0) {
            more = 2;
            lo = 0xA0;
        } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
            more = 2;
        else if (c == 0xED) {
            more = 2;
            hi = 0x9F;
        } else if (c == 0xF0) {
            more = 3;
            lo = 0x90;
        } else if (c >= 0xF1 && c <= 0xF3)
            more = 3;
        else if (c == 0xF4) {
            more = 3;
            hi = 0x8F;
        } else
            return 0;
        if (n - i - 1 < more)
            return 0;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return 0;
        for (Py_ssize_t k = 2; k <= more; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF)
                return 0;
        i += more + 1;
        count++;
    }
    *chars = count;
    return 1;
}

static PyObject *
bind_malformed(void)
{
    PyErr_SetString(Malformed, "malformed Bind message");
    return NULL;
}

/*
 * seal_bind(body, targets, keys) -> (message, sealed) or None.
 *
 * body: a Bind message's body. targets: one (index, slot, binary_ok, max_chars, associated) tuple per
 * protected parameter (distinct indexes; a target past the Bind's parameters is skipped, as in Python);
 * keys: one (Key, prefix) per slot, prefix the 20 bytes magic . version . algorithm . key id of the
 * column's current key (a column's key: no subject part).
 *
 * Returns the whole rewritten Bind ('B', Int32 length, body) and how many values it sealed: every target
 * that is not NULL sealed into a v1 envelope (a fresh nonce each), sent in binary; the parameter formats
 * written out in full, one per parameter; every other byte copied. None when some value is not what the
 * Python path takes as is (text that is not valid UTF-8 or holds a NUL, a varchar(N) value of more than
 * N characters, a binary value of a target that takes only text): the caller then runs the Python path,
 * which decides and words the error. Malformed for a body that is not a well-formed Bind; ValueError or
 * TypeError for a plan that is not one. Nothing is sealed before every value was checked.
 *
 * Memory safety: the body is read only at offsets checked against its length (lengths from the wire
 * are Int32, sums are Py_ssize_t, so nothing overflows); the output's exact size is computed from the
 * checked offsets first, and every write is checked against it again. Nothing calls back into Python
 * between the checks and the writes, so the borrowed buffers cannot change.
 */
static PyObject *
seal_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "seal_bind(body, targets, keys)");
        return NULL;
    }
    if (!PyBytes_Check(args[0]) || !PyTuple_Check(args[1]) || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "seal_bind(body: bytes, targets: tuple, keys: tuple)");
        return NULL;
    }
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const Py_ssize_t len = PyBytes_GET_SIZE(args[0]);
    PyObject *targets = args[1], *keys = args[2];
    Py_ssize_t *offsets = NULL; /* n + 1 parameter offsets, then n target numbers (-1: none) */
    BindTarget *plan = NULL;
    PyObject *out = NULL;

    /* The body, exactly as codec._bind_frame accepts it. */
    const unsigned char *nul = memchr(b, 0, (size_t)len);
    if (nul == NULL)
        return bind_malformed();
    Py_ssize_t portal_end = nul - b;
    nul = memchr(b + portal_end + 1, 0, (size_t)(len - portal_end - 1));
    if (nul == NULL)
        return bind_malformed();
    const Py_ssize_t names_end = nul - b + 1;
    Py_ssize_t pos = names_end;
    if (len - pos < 2)
        return bind_malformed();
    const Py_ssize_t nfmt = bind_u16(b + pos);
    pos += 2;
    if ((len - pos) / 2 < nfmt)
        return bind_malformed();
    const unsigned char *fmts = b + pos; /* nfmt Int16 codes, each 0 or 1 */
    for (Py_ssize_t k = 0; k < nfmt; k++)
        if (fmts[2 * k] != 0 || fmts[2 * k + 1] > 1)
            return bind_malformed();
    pos += 2 * nfmt;
    const Py_ssize_t values_start = pos;
    if (len - pos < 2)
        return bind_malformed();
    const Py_ssize_t n = bind_u16(b + pos);
    pos += 2;
    offsets = PyMem_Malloc((size_t)(2 * n + 1) * sizeof(Py_ssize_t));
    if (offsets == NULL)
        return PyErr_NoMemory();
    Py_ssize_t *target_of = offsets + n + 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        offsets[i] = pos;
        target_of[i] = -1;
        if (len - pos < 4)
            goto malformed;
        int32_t l = (int32_t)be32(b + pos);
        pos += 4;
        if (l > 0) {
            if (len - pos < (Py_ssize_t)l)
                goto malformed;
            pos += l;
        } else if (l < -1)
            goto malformed;
    }
    offsets[n] = pos;
    const Py_ssize_t results_start = pos;
    if (len - pos < 2)
        goto malformed;
    const Py_ssize_t nres = bind_u16(b + pos);
    if ((len - pos - 2) % 2 != 0 || (len - pos - 2) / 2 != nres)
        goto malformed;
    for (Py_ssize_t k = 0; k < nres; k++)
        if (b[pos + 2 + 2 * k] != 0 || b[pos + 3 + 2 * k] > 1)
            goto malformed;

    /* The plan. */
    const Py_ssize_t nt = PyTuple_GET_SIZE(targets), nk = PyTuple_GET_SIZE(keys);
    plan = PyMem_Malloc((size_t)(nt > 0 ? nt : 1) * sizeof(BindTarget));
    if (plan == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t t = 0; t < nt; t++) {
        PyObject *item = PyTuple_GET_ITEM(targets, t);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 5 || !PyBytes_Check(PyTuple_GET_ITEM(item, 4))) {
            PyErr_SetString(PyExc_TypeError, "a target is (index, slot, binary_ok, max_chars, associated)");
            goto fail;
        }
        BindTarget *bt = &plan[t];
        Py_ssize_t slot = -1, binary_ok = 0;
        bt->index = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 0));
        if (bt->index == -1 && PyErr_Occurred())
            goto fail;
        slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
        if (slot == -1 && PyErr_Occurred())
            goto fail;
        binary_ok = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 2));
        if (binary_ok == -1 && PyErr_Occurred())
            goto fail;
        bt->max_chars = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 3));
        if (bt->max_chars == -1 && PyErr_Occurred())
            goto fail;
        bt->binary_ok = binary_ok != 0;
        bt->aad = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 4));
        bt->aad_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 4));
        if (bt->index < 0 || slot < 0 || slot >= nk || bt->max_chars < -1) {
            PyErr_SetString(PyExc_ValueError, "a target's index, slot or max_chars is out of range");
            goto fail;
        }
        if (check_int_length(bt->aad_len, "associated data") < 0 || bt->aad_len > INT_MAX - HEADER_LENGTH)
            goto fail;
        PyObject *pair = PyTuple_GET_ITEM(keys, slot);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyObject_TypeCheck(PyTuple_GET_ITEM(pair, 0), &KeyType) || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "a key is (Key, prefix)");
            goto fail;
        }
        bt->key = (KeyObject *)PyTuple_GET_ITEM(pair, 0);
        PyObject *prefix = PyTuple_GET_ITEM(pair, 1);
        bt->prefix = (const unsigned char *)PyBytes_AS_STRING(prefix);
        if (PyBytes_GET_SIZE(prefix) != KEY_END || memcmp(bt->prefix, PREFIX_V1, PREFIX_LENGTH) != 0 ||
            bt->key->suffix_len != 0) {
            PyErr_SetString(PyExc_ValueError, "a key's prefix is a v1 envelope's first 20 bytes, of a column's key");
            goto fail;
        }
        if (bt->index < n) {
            if (target_of[bt->index] >= 0) {
                PyErr_SetString(PyExc_ValueError, "two targets for one parameter");
                goto fail;
            }
            target_of[bt->index] = t;
        }
    }

    /* Every value checked, and the output's size, before anything is sealed. */
    Py_ssize_t growth = 0, sealed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (target_of[i] < 0)
            continue;
        int32_t l = (int32_t)be32(b + offsets[i]);
        if (l < 0)
            continue; /* NULL stays NULL */
        const BindTarget *bt = &plan[target_of[i]];
        int binary = nfmt == 0 ? 0 : nfmt == 1 ? fmts[1] : i < nfmt ? fmts[2 * i + 1] : 0;
        Py_ssize_t chars = 0;
        if ((binary && !bt->binary_ok) || !utf8_text(b + offsets[i] + 4, l, &chars) ||
            (bt->max_chars >= 0 && chars > bt->max_chars) || l > INT_MAX - 2 * TAG_LENGTH - HEADER_LENGTH)
            goto python;
        growth += MIN_LENGTH;
        sealed++;
    }
    /* 'B' . length . names . formats (n of them) . values . result formats */
    const Py_ssize_t total = 5 + names_end + 2 + 2 * n + (results_start - values_start) + growth + (len - results_start);
    if (total - 1 > (Py_ssize_t)UINT32_MAX)
        goto python;
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        goto fail;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    Py_ssize_t w = 0;
#define ROOM(k) do { if (total - w < (Py_ssize_t)(k)) goto overrun; } while (0)
    ROOM(5 + names_end + 2);
    o[0] = 'B';
    put_be32(o + 1, (uint32_t)(total - 1));
    memcpy(o + 5, b, (size_t)names_end);
    w = 5 + names_end;
    o[w] = (unsigned char)(n >> 8);
    o[w + 1] = (unsigned char)n;
    w += 2;
    for (Py_ssize_t i = 0; i < n; i++) {
        int code = nfmt == 0 ? 0 : nfmt == 1 ? fmts[1] : i < nfmt ? fmts[2 * i + 1] : 0;
        if (target_of[i] >= 0 && (int32_t)be32(b + offsets[i]) >= 0)
            code = 1;
        ROOM(2);
        o[w] = 0;
        o[w + 1] = (unsigned char)code;
        w += 2;
    }
    ROOM(2);
    memcpy(o + w, b + values_start, 2);
    w += 2;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t l = (int32_t)be32(b + offsets[i]);
        if (target_of[i] < 0 || l < 0) {
            Py_ssize_t k = offsets[i + 1] - offsets[i];
            ROOM(k);
            memcpy(o + w, b + offsets[i], (size_t)k);
            w += k;
            continue;
        }
        const BindTarget *bt = &plan[target_of[i]];
        ROOM(4 + MIN_LENGTH + (Py_ssize_t)l);
        unsigned char *env = o + w + 4;
        put_be32(o + w, (uint32_t)(l + MIN_LENGTH));
        memcpy(env, bt->prefix, KEY_END);
        if (random_nonce(env + KEY_END) < 0 ||
            gcm_seal(bt->key->enc, env + KEY_END, env, HEADER_LENGTH, bt->aad, (size_t)bt->aad_len,
                     b + offsets[i] + 4, (size_t)l, env + HEADER_LENGTH, env + HEADER_LENGTH + l) < 0)
            goto fail;
        w += 4 + MIN_LENGTH + l;
    }
    ROOM(len - results_start);
    memcpy(o + w, b + results_start, (size_t)(len - results_start));
    w += len - results_start;
#undef ROOM
    if (w != total)
        goto overrun;
    PyMem_Free(offsets);
    PyMem_Free(plan);
    return Py_BuildValue("(Nn)", out, sealed);

python:
    PyMem_Free(offsets);
    PyMem_Free(plan);
    Py_RETURN_NONE;
overrun:
    PyErr_SetString(PyExc_SystemError, "seal_bind: output size mismatch");
    goto fail;
malformed:
    PyErr_SetString(Malformed, "malformed Bind message");
fail:
    Py_XDECREF(out);
    PyMem_Free(offsets);
    PyMem_Free(plan);
    return NULL;
}

/* -- the own GCM open: its checks and the choice ------------------------------------------------------- */

static int
unhex(const char *hex, unsigned char *out, size_t cap)
{
    size_t n = strlen(hex) / 2;
    if (n > cap)
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned int v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (unsigned char)v;
    }
    return (int)n;
}

/* The AES-256 test cases 13 to 16 of the GCM specification (McGrew and Viega), 96-bit IVs. */
static const struct {
    const char *key, *iv, *aad, *pt, *ct, *tag;
} GCM_KATS[] = {
    {"0000000000000000000000000000000000000000000000000000000000000000", "000000000000000000000000", "", "", "",
     "530f8afbc74536b9a963b4f1c4cb738b"},
    {"0000000000000000000000000000000000000000000000000000000000000000", "000000000000000000000000", "",
     "00000000000000000000000000000000", "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"},
    {"feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888", "",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657"
     "ba637b391aafd255",
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a"
     "0abcc9f662898015ad",
     "b094dac5d93471bdec1a502270e3cc6c"},
    {"feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888",
     "feedfacedeadbeeffeedfacedeadbeefabaddad2",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657"
     "ba637b39",
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a"
     "0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"},
};

/* NULL when the own open gives the specification's answers and OpenSSL's on inputs of every length
 * class (sealed by EVP, opened by both; each tampered with), else what failed. Needs the CPU support. */
static const char *
gcm_check(void)
{
    static const size_t LENGTHS[] = {0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 100, 257};
    static const size_t AADS[] = {0, 1, 12, 16, 20, 32, 52, 64, 200, 1024};
    const char *failed = NULL;
    pv_gcm_key k;
    unsigned char key[32], iv[12], aad[1024], pt[300], ct[300], tag[16], got[300], evp_out[300];
    for (size_t i = 0; i < sizeof(GCM_KATS) / sizeof(GCM_KATS[0]); i++) {
        int kl = unhex(GCM_KATS[i].key, key, sizeof(key)), il = unhex(GCM_KATS[i].iv, iv, sizeof(iv));
        int al = unhex(GCM_KATS[i].aad, aad, sizeof(aad)), pl = unhex(GCM_KATS[i].pt, pt, sizeof(pt));
        int cl = unhex(GCM_KATS[i].ct, ct, sizeof(ct)), tl = unhex(GCM_KATS[i].tag, tag, sizeof(tag));
        if (kl != 32 || il != 12 || al < 0 || pl < 0 || cl != pl || tl != 16)
            return "a known-answer vector does not parse";
        pv_gcm_init(&k, key);
        memset(got, 0xa5, sizeof(got));
        if (pv_gcm_open(&k, iv, aad, (size_t)al, NULL, 0, ct, (size_t)cl, tag, got) != 0 ||
            memcmp(got, pt, (size_t)pl) != 0) {
            failed = "a known-answer test of the GCM specification failed";
            goto done;
        }
        tag[15] ^= 1;
        memset(got, 0xa5, sizeof(got));
        if (pv_gcm_open(&k, iv, aad, (size_t)al, NULL, 0, ct, (size_t)cl, tag, got) != 1 || got[0] != 0xa5) {
            failed = "a tampered known-answer tag was accepted or its plaintext written";
            goto done;
        }
    }
    EVP_CIPHER_CTX *enc = EVP_CIPHER_CTX_new(), *dec = EVP_CIPHER_CTX_new();
    unsigned char material[32 + 12 + 1024 + 300];
    if (enc == NULL || dec == NULL || getrandom(material, sizeof(material), 0) != (ssize_t)sizeof(material)) {
        failed = "could not set up the comparison with OpenSSL";
        goto evp_done;
    }
    memcpy(key, material, 32);
    memcpy(iv, material + 32, 12);
    memcpy(aad, material + 44, sizeof(aad));
    memcpy(pt, material + 44 + sizeof(aad), sizeof(pt));
    if (EVP_EncryptInit_ex(enc, EVP_aes_256_gcm(), NULL, key, NULL) != 1 ||
        EVP_DecryptInit_ex(dec, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
        failed = "could not set up the comparison with OpenSSL";
        goto evp_done;
    }
    pv_gcm_init(&k, key);
    for (size_t a = 0; a < sizeof(AADS) / sizeof(AADS[0]) && failed == NULL; a++) {
        for (size_t l = 0; l < sizeof(LENGTHS) / sizeof(LENGTHS[0]) && failed == NULL; l++) {
            size_t al = AADS[a], pl = LENGTHS[l], split = al / 3;
            if (gcm_seal(enc, iv, aad, split, aad + split, al - split, pt, pl, ct, tag) < 0) {
                PyErr_Clear();
                failed = "OpenSSL failed to seal for the comparison";
                break;
            }
            memset(got, 0xa5, sizeof(got));
            if (pv_gcm_open(&k, iv, aad, split, aad + split, al - split, ct, pl, tag, got) != 0 ||
                memcmp(got, pt, pl) != 0) {
                failed = "the open disagrees with OpenSSL's seal";
                break;
            }
            /* One bit of each part flipped: both refuse, and the own open writes nothing. */
            unsigned char *parts[4] = {tag, pl > 0 ? ct : NULL, al > 0 ? aad : NULL, iv};
            size_t sizes[4] = {16, pl, al, 12};
            for (int p = 0; p < 4 && failed == NULL; p++) {
                if (parts[p] == NULL)
                    continue;
                size_t bit = (a * 31 + l * 7 + (size_t)p) % (8 * sizes[p]);
                parts[p][bit / 8] ^= (unsigned char)(1u << (bit % 8));
                memset(got, 0xa5, sizeof(got));
                int mine = pv_gcm_open(&k, iv, aad, split, aad + split, al - split, ct, pl, tag, got);
                int theirs = gcm_open_evp(dec, iv, aad, split, aad + split, al - split, ct, pl, tag, evp_out);
                if (theirs < 0)
                    PyErr_Clear();
                if (mine != 1 || theirs != 1 || got[0] != 0xa5)
                    failed = "a tampered input was not refused";
                parts[p][bit / 8] ^= (unsigned char)(1u << (bit % 8));
            }
        }
    }
evp_done:
    EVP_CIPHER_CTX_free(enc);
    EVP_CIPHER_CTX_free(dec);
    OPENSSL_cleanse(material, sizeof(material));
    OPENSSL_cleanse(evp_out, sizeof(evp_out));
done:
    pv_gcm_wipe(&k);
    OPENSSL_cleanse(key, sizeof(key));
    return failed;
}

/* Sets gcm_fast and gcm_why: PGVEIL_GCM=evp forces EVP; otherwise the own open where the build and the
 * CPU support it and it passes gcm_check. */
static void
choose_gcm(void)
{
    const char *wanted = getenv("PGVEIL_GCM");
    gcm_fast = 0;
    if (wanted != NULL && strcmp(wanted, "evp") == 0) {
        gcm_why = "PGVEIL_GCM=evp";
        return;
    }
    if (wanted != NULL && wanted[0] != '\0' && strcmp(wanted, "auto") != 0) {
        gcm_why = "PGVEIL_GCM is neither 'auto' nor 'evp'";
        return;
    }
    const char *why = "";
    if (!pv_gcm_supported(&why)) {
        gcm_why = why;
        return;
    }
    const char *failed = gcm_check();
    if (failed != NULL) {
        gcm_why = failed;
        return;
    }
    gcm_fast = 1;
    gcm_why = "";
}

static PyObject *
gcm_implementation(PyObject *module, PyObject *unused)
{
    return PyUnicode_FromString(gcm_fast ? "aesni-pclmul" : "evp");
}

static PyObject *
gcm_fallback_reason(PyObject *module, PyObject *unused)
{
    return PyUnicode_FromString(gcm_why);
}

static PyObject *
gcm_self_test(PyObject *module, PyObject *unused)
{
    const char *why = "";
    if (!pv_gcm_supported(&why))
        Py_RETURN_NONE;
    const char *failed = gcm_check();
    if (failed != NULL)
        return PyUnicode_FromString(failed);
    Py_RETURN_TRUE;
}

static PyMethodDef module_methods[] = {
    {"rewrite_rows", (PyCFunction)(void (*)(void))rewrite_rows, METH_FASTCALL,
     "rewrite_rows(data, start, end, columns, opener[, checks]) -> the rewritten run of DataRows"},
    {"data_row_run", (PyCFunction)(void (*)(void))data_row_run, METH_FASTCALL,
     "data_row_run(data, end, n) -> (end, count) of the run of complete DataRows"},
    {"seal_bind", (PyCFunction)(void (*)(void))seal_bind, METH_FASTCALL,
     "seal_bind(body, targets, keys) -> (the rewritten Bind, values sealed), or None for the Python path"},
    {"gcm_implementation", gcm_implementation, METH_NOARGS,
     "gcm_implementation() -> 'aesni-pclmul' (the own AES-GCM open) or 'evp' (OpenSSL's)"},
    {"gcm_fallback_reason", gcm_fallback_reason, METH_NOARGS,
     "gcm_fallback_reason() -> why the open runs on EVP ('' when it does not)"},
    {"gcm_self_test", gcm_self_test, METH_NOARGS,
     "gcm_self_test() -> True, what failed, or None where the CPU cannot run the own open"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pgveil_accel",
    .m_doc = "pgveil's native hot path: AES-256-GCM over OpenSSL, the DataRow kernel, the DataRow run scan.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit_pgveil_accel(void)
{
    init_hex();
    choose_gcm();
    if (PyType_Ready(&KeyType) < 0 || PyType_Ready(&OpenerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&accel_module);
    if (m == NULL)
        return NULL;
    InvalidTag = PyErr_NewException("pgveil_accel.InvalidTag", NULL, NULL);
    RowRefused = PyErr_NewException("pgveil_accel.RowRefused", NULL, NULL);
    Malformed = PyErr_NewException("pgveil_accel.Malformed", NULL, NULL);
    Unsupported = PyErr_NewException("pgveil_accel.Unsupported", NULL, NULL);
    if (InvalidTag == NULL || RowRefused == NULL || Malformed == NULL || Unsupported == NULL)
        goto fail;
    if (PyModule_AddObjectRef(m, "InvalidTag", InvalidTag) < 0 ||
        PyModule_AddObjectRef(m, "RowRefused", RowRefused) < 0 ||
        PyModule_AddObjectRef(m, "Malformed", Malformed) < 0 ||
        PyModule_AddObjectRef(m, "Unsupported", Unsupported) < 0 ||
        PyModule_AddObjectRef(m, "Key", (PyObject *)&KeyType) < 0 ||
        PyModule_AddObjectRef(m, "Opener", (PyObject *)&OpenerType) < 0)
        goto fail;
    PyObject *prefix = PyBytes_FromStringAndSize((const char *)PREFIX_V1, PREFIX_LENGTH);
    if (prefix == NULL || PyModule_AddObject(m, "PREFIX_V1", prefix) < 0) {
        Py_XDECREF(prefix);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "KEY_ID_LENGTH", KEY_ID_LENGTH) < 0 ||
        PyModule_AddIntConstant(m, "NONCE_LENGTH", NONCE_LENGTH) < 0 ||
        PyModule_AddIntConstant(m, "TAG_LENGTH", TAG_LENGTH) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_LENGTH", HEADER_LENGTH) < 0 ||
        PyModule_AddIntConstant(m, "NULL_COLUMNS", 1) < 0 ||
        PyModule_AddIntConstant(m, "MASK_COLUMNS", 1) < 0 ||
        PyModule_AddIntConstant(m, "TEXT_MASKS", 1) < 0 ||
        PyModule_AddIntConstant(m, "SCREEN_COLUMNS", 2) < 0 ||
        PyModule_AddIntConstant(m, "SUBJECT_KEYS", MAX_SUBJECT_SUFFIX) < 0 ||
        PyModule_AddIntConstant(m, "SUBJECT_CHECKS", MAX_SUBJECT_ID) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0 ||
        PyModule_AddStringConstant(m, "__version__", ACCEL_VERSION) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
