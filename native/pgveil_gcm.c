/*
 * pgveil_gcm: AES-256-GCM open with AES-NI and PCLMULQDQ (see pgveil_gcm.h for why and what it promises).
 *
 * The algorithms are the public ones: AES-256 key expansion with AESKEYGENASSIST; GHASH in the
 * byte-reflected representation (each block byte-swapped on load), multiplied with four carry-less
 * multiplications (schoolbook) and reduced modulo x^128 + x^7 + x^2 + x + 1 after the one-bit left shift
 * the reflected representation needs, as in Gueron and Kounavis's white paper on carry-less
 * multiplication and GCM; four blocks are multiplied by H^4..H^1 and reduced once (aggregated
 * reduction). CTR keystream blocks are computed four at a time so the AES rounds of independent blocks
 * overlap.
 *
 * Order of work in pv_gcm_open: GHASH over the associated data and the ciphertext (no plaintext needed),
 * the tag E_K(J0) xor GHASH compared with the given one in constant time, and only then the decryption
 * into out. Every read is within the lengths given; partial blocks go through zeroed 16-byte scratch
 * buffers, which are wiped afterwards.
 */
#include "pgveil_gcm.h"

#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PV_GCM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

static void
wipe(void *p, size_t n)
{
    volatile unsigned char *v = (volatile unsigned char *)p;
    while (n--)
        *v++ = 0;
}

void
pv_gcm_wipe(pv_gcm_key *key)
{
    wipe(key, sizeof(*key));
}

#ifdef PV_GCM_X86

#define TGT __attribute__((target("aes,pclmul,ssse3,sse4.1")))

int
pv_gcm_supported(const char **why)
{
    unsigned int a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) {
        *why = "cpuid leaf 1 is not available";
        return 0;
    }
    if (!(c & bit_AES) || !(c & bit_PCLMUL) || !(c & bit_SSE4_1) || !(c & bit_SSSE3)) {
        *why = "the CPU lacks AES-NI, PCLMULQDQ, SSSE3 or SSE4.1";
        return 0;
    }
    *why = "";
    return 1;
}

TGT static inline __m128i
bswap(__m128i x)
{
    const __m128i mask = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm_shuffle_epi8(x, mask);
}

/* One step of the AES-256 key expansion (the words after a keygenassist result t). */
TGT static inline __m128i
expand_step(__m128i key, __m128i t)
{
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, t);
}

TGT static inline __m128i
aes_encrypt(const __m128i *rk, __m128i x)
{
    x = _mm_xor_si128(x, rk[0]);
    for (int r = 1; r < 14; r++)
        x = _mm_aesenc_si128(x, rk[r]);
    return _mm_aesenclast_si128(x, rk[14]);
}

/* The 256-bit carry-less product of a and b, as (lo, hi). */
TGT static inline void
clmul_wide(__m128i a, __m128i b, __m128i *lo, __m128i *hi)
{
    __m128i t0 = _mm_clmulepi64_si128(a, b, 0x00);
    __m128i t1 = _mm_clmulepi64_si128(a, b, 0x10);
    __m128i t2 = _mm_clmulepi64_si128(a, b, 0x01);
    __m128i t3 = _mm_clmulepi64_si128(a, b, 0x11);
    t1 = _mm_xor_si128(t1, t2);
    *lo = _mm_xor_si128(t0, _mm_slli_si128(t1, 8));
    *hi = _mm_xor_si128(t3, _mm_srli_si128(t1, 8));
}

/* (lo, hi) shifted left by one bit (the reflected representation) and reduced modulo the GCM polynomial. */
TGT static inline __m128i
reduce(__m128i lo, __m128i hi)
{
    __m128i c_lo = _mm_srli_epi32(lo, 31);
    __m128i c_hi = _mm_srli_epi32(hi, 31);
    lo = _mm_slli_epi32(lo, 1);
    hi = _mm_slli_epi32(hi, 1);
    __m128i carry_out = _mm_srli_si128(c_lo, 12);
    c_hi = _mm_slli_si128(c_hi, 4);
    c_lo = _mm_slli_si128(c_lo, 4);
    lo = _mm_or_si128(lo, c_lo);
    hi = _mm_or_si128(hi, c_hi);
    hi = _mm_or_si128(hi, carry_out);

    __m128i a = _mm_slli_epi32(lo, 31);
    __m128i b = _mm_slli_epi32(lo, 30);
    __m128i c = _mm_slli_epi32(lo, 25);
    a = _mm_xor_si128(a, b);
    a = _mm_xor_si128(a, c);
    b = _mm_srli_si128(a, 4);
    a = _mm_slli_si128(a, 12);
    lo = _mm_xor_si128(lo, a);
    __m128i e = _mm_srli_epi32(lo, 1);
    __m128i f = _mm_srli_epi32(lo, 2);
    __m128i g = _mm_srli_epi32(lo, 7);
    e = _mm_xor_si128(e, f);
    e = _mm_xor_si128(e, g);
    e = _mm_xor_si128(e, b);
    lo = _mm_xor_si128(lo, e);
    return _mm_xor_si128(hi, lo);
}

TGT static inline __m128i
gf_mul(__m128i a, __m128i b)
{
    __m128i lo, hi;
    clmul_wide(a, b, &lo, &hi);
    return reduce(lo, hi);
}

TGT void
pv_gcm_init(pv_gcm_key *key, const unsigned char material[32])
{
    __m128i rk[15];
    __m128i k0 = _mm_loadu_si128((const __m128i *)material);
    __m128i k1 = _mm_loadu_si128((const __m128i *)(material + 16));
    rk[0] = k0;
    rk[1] = k1;
#define PV_EXPAND(i, rcon)                                                                     \
    do {                                                                                       \
        k0 = expand_step(k0, _mm_shuffle_epi32(_mm_aeskeygenassist_si128(k1, rcon), 0xff));    \
        rk[i] = k0;                                                                            \
        if ((i) + 1 < 15) {                                                                    \
            k1 = expand_step(k1, _mm_shuffle_epi32(_mm_aeskeygenassist_si128(k0, 0x00), 0xaa)); \
            rk[(i) + 1] = k1;                                                                  \
        }                                                                                      \
    } while (0)
    PV_EXPAND(2, 0x01);
    PV_EXPAND(4, 0x02);
    PV_EXPAND(6, 0x04);
    PV_EXPAND(8, 0x08);
    PV_EXPAND(10, 0x10);
    PV_EXPAND(12, 0x20);
    PV_EXPAND(14, 0x40);
#undef PV_EXPAND
    __m128i h = bswap(aes_encrypt(rk, _mm_setzero_si128()));
    __m128i h2 = gf_mul(h, h);
    __m128i h3 = gf_mul(h2, h);
    __m128i h4 = gf_mul(h3, h);
    for (int i = 0; i < 15; i++)
        _mm_store_si128((__m128i *)(key->round_keys + 16 * i), rk[i]);
    _mm_store_si128((__m128i *)(key->h_powers + 0), h);
    _mm_store_si128((__m128i *)(key->h_powers + 16), h2);
    _mm_store_si128((__m128i *)(key->h_powers + 32), h3);
    _mm_store_si128((__m128i *)(key->h_powers + 48), h4);
    wipe(rk, sizeof(rk));
}

/* GHASH of n whole blocks at p into x: four at a time multiplied by H^4..H^1 and reduced once, and the
 * last one to three blocks the same way with H^n..H^1. */
TGT static inline __m128i
ghash_blocks(__m128i x, const unsigned char *p, size_t n, const __m128i *hp)
{
    while (n > 0) {
        size_t m = n < 4 ? n : 4;
        __m128i lo, hi, l, h;
        clmul_wide(_mm_xor_si128(x, bswap(_mm_loadu_si128((const __m128i *)p))), hp[m - 1], &lo, &hi);
        for (size_t j = 1; j < m; j++) {
            clmul_wide(bswap(_mm_loadu_si128((const __m128i *)(p + 16 * j))), hp[m - 1 - j], &l, &h);
            lo = _mm_xor_si128(lo, l);
            hi = _mm_xor_si128(hi, h);
        }
        x = reduce(lo, hi);
        p += 16 * m;
        n -= m;
    }
    return x;
}

/* The counter block for block number i of the message (J0 is number 1, the first data block 2). */
TGT static inline __m128i
counter_block(__m128i j, uint32_t i)
{
    return _mm_insert_epi32(j, (int)__builtin_bswap32(i), 3);
}

/* Four blocks through AES with their rounds interleaved (kept in registers). */
TGT static inline void
aes4(const __m128i *rk, __m128i *b0, __m128i *b1, __m128i *b2, __m128i *b3)
{
    __m128i x0 = _mm_xor_si128(*b0, rk[0]), x1 = _mm_xor_si128(*b1, rk[0]);
    __m128i x2 = _mm_xor_si128(*b2, rk[0]), x3 = _mm_xor_si128(*b3, rk[0]);
    for (int r = 1; r < 14; r++) {
        x0 = _mm_aesenc_si128(x0, rk[r]);
        x1 = _mm_aesenc_si128(x1, rk[r]);
        x2 = _mm_aesenc_si128(x2, rk[r]);
        x3 = _mm_aesenc_si128(x3, rk[r]);
    }
    *b0 = _mm_aesenclast_si128(x0, rk[14]);
    *b1 = _mm_aesenclast_si128(x1, rk[14]);
    *b2 = _mm_aesenclast_si128(x2, rk[14]);
    *b3 = _mm_aesenclast_si128(x3, rk[14]);
}

/* Clears 16 bytes that held plaintext (one store the compiler may not drop). */
TGT static inline void
clear16(unsigned char *p)
{
    _mm_storeu_si128((__m128i *)p, _mm_setzero_si128());
    __asm__ __volatile__("" : : "r"(p) : "memory");
}

/* out[0..len) = in[0..len) xor keystream, len <= 16. */
TGT static inline void
xor_block(unsigned char *out, const unsigned char *in, size_t len, __m128i ks)
{
    if (len == 16) {
        _mm_storeu_si128((__m128i *)out, _mm_xor_si128(_mm_loadu_si128((const __m128i *)in), ks));
        return;
    }
    unsigned char buf[16] = {0};
    memcpy(buf, in, len);
    _mm_storeu_si128((__m128i *)buf, _mm_xor_si128(_mm_loadu_si128((const __m128i *)buf), ks));
    memcpy(out, buf, len);
    clear16(buf);
}

/* Ciphertexts up to this long are hashed from one buffer with the associated data (one GHASH run);
 * longer ones straight from where they are. */
#define JOINED_CIPHERTEXT 256

TGT int
pv_gcm_open(const pv_gcm_key *key, const unsigned char nonce[12], const unsigned char *aad1, size_t aad1_len,
            const unsigned char *aad2, size_t aad2_len, const unsigned char *ciphertext, size_t ciphertext_len,
            const unsigned char tag[16], unsigned char *out)
{
    if (aad1_len > PV_GCM_MAX_AAD || aad2_len > PV_GCM_MAX_AAD - aad1_len)
        return -1;
    const __m128i *rk = (const __m128i *)key->round_keys;
    const __m128i *hp = (const __m128i *)key->h_powers;
    size_t aad_len = aad1_len + aad2_len;
    size_t full = ciphertext_len / 16, rest = ciphertext_len % 16, blocks = full + (rest > 0);

    /* What GHASH covers, in order: the associated data zero-padded to whole blocks, the ciphertext
     * likewise, and the block of the two bit lengths (big-endian). Nothing here is secret. */
    _Alignas(16) unsigned char g[PV_GCM_MAX_AAD + JOINED_CIPHERTEXT + 32];
    size_t aad_blocks = (aad_len + 15) / 16, at = 0;
    if (aad1_len > 0)
        memcpy(g, aad1, aad1_len);
    if (aad2_len > 0)
        memcpy(g + aad1_len, aad2, aad2_len);
    memset(g + aad_len, 0, aad_blocks * 16 - aad_len);
    at = aad_blocks * 16;
    __m128i x = _mm_setzero_si128();
    if (ciphertext_len <= JOINED_CIPHERTEXT) {
        if (ciphertext_len > 0)
            memcpy(g + at, ciphertext, ciphertext_len);
        memset(g + at + ciphertext_len, 0, blocks * 16 - ciphertext_len);
        at += blocks * 16;
    } else {
        x = ghash_blocks(x, g, aad_blocks, hp);
        x = ghash_blocks(x, ciphertext, full, hp);
        at = 0;
        if (rest > 0) {
            memset(g, 0, 16);
            memcpy(g, ciphertext + 16 * full, rest);
            at = 16;
        }
    }
    uint64_t abits = (uint64_t)aad_len * 8, cbits = (uint64_t)ciphertext_len * 8;
    for (int i = 0; i < 8; i++) {
        g[at + 7 - (size_t)i] = (unsigned char)(abits >> (8 * i));
        g[at + 15 - (size_t)i] = (unsigned char)(cbits >> (8 * i));
    }
    at += 16;
    x = ghash_blocks(x, g, at / 16, hp);

    /* E_K(J0) and the first three keystream blocks together. */
    unsigned char j0_bytes[16];
    memcpy(j0_bytes, nonce, 12);
    j0_bytes[12] = j0_bytes[13] = j0_bytes[14] = 0;
    j0_bytes[15] = 1;
    __m128i j0 = _mm_loadu_si128((const __m128i *)j0_bytes);
    __m128i e0 = j0, k1 = counter_block(j0, 2), k2 = counter_block(j0, 3), k3 = counter_block(j0, 4);
    aes4(rk, &e0, &k1, &k2, &k3);
    __m128i diff = _mm_xor_si128(_mm_xor_si128(e0, bswap(x)), _mm_loadu_si128((const __m128i *)tag));
    if (!_mm_testz_si128(diff, diff))
        return 1; /* nothing written */

    /* Authentic: decrypt. */
    __m128i ks[4] = {k1, k2, k3, _mm_setzero_si128()};
    size_t done = 0;
    for (int k = 0; k < 3 && done < blocks; k++, done++)
        xor_block(out + 16 * done, ciphertext + 16 * done, done < full ? 16 : rest, ks[k]);
    while (done < blocks) {
        __m128i b0 = counter_block(j0, (uint32_t)(done + 2)), b1 = counter_block(j0, (uint32_t)(done + 3));
        __m128i b2 = counter_block(j0, (uint32_t)(done + 4)), b3 = counter_block(j0, (uint32_t)(done + 5));
        aes4(rk, &b0, &b1, &b2, &b3);
        ks[0] = b0;
        ks[1] = b1;
        ks[2] = b2;
        ks[3] = b3;
        for (int k = 0; k < 4 && done < blocks; k++, done++)
            xor_block(out + 16 * done, ciphertext + 16 * done, done < full ? 16 : rest, ks[k]);
    }
    clear16((unsigned char *)&ks[0]);
    clear16((unsigned char *)&ks[1]);
    clear16((unsigned char *)&ks[2]);
    clear16((unsigned char *)&ks[3]);
    return 0;
}

#else /* not x86-64 with GCC or clang: EVP only */

int
pv_gcm_supported(const char **why)
{
    *why = "built for an architecture without the AES-NI code";
    return 0;
}

void
pv_gcm_init(pv_gcm_key *key, const unsigned char material[32])
{
    (void)material;
    memset(key, 0, sizeof(*key));
}

int
pv_gcm_open(const pv_gcm_key *key, const unsigned char nonce[12], const unsigned char *aad1, size_t aad1_len,
            const unsigned char *aad2, size_t aad2_len, const unsigned char *ciphertext, size_t ciphertext_len,
            const unsigned char tag[16], unsigned char *out)
{
    return -1;
}

#endif
