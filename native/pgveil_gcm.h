/*
 * pgveil_gcm: AES-256-GCM *open* (tag check, then decryption) below OpenSSL's EVP layer, with AES-NI and
 * carry-less multiplication on a per-key precomputed key schedule and GHASH key powers.
 *
 * Why: for pgveil's small values (an envelope's plaintext is a few dozen bytes) OpenSSL 3's EVP sequence
 * (init with the nonce, AAD update, update, the tag as a parameter, final) costs about 190 ns a value
 * through its provider dispatch, several times the cipher's own work. Sealing stays on EVP (its cost is
 * a small part of a write); so do CPUs without AES-NI and PCLMULQDQ, and builds for other architectures.
 *
 * Guarantees: constant time in the key and the data (no table lookups, a tag comparison without early
 * exit); nothing is written to `out` unless the tag verifies; the key schedule is wiped by
 * pv_gcm_wipe. pgveil_accel checks this code against OpenSSL and the GCM specification's test vectors
 * when it loads and runs EVP instead if any check fails.
 */
#ifndef PGVEIL_GCM_H
#define PGVEIL_GCM_H

#include <stddef.h>
#include <stdint.h>

/* 15 round keys and H^1..H^4 (byte-reflected), 16 bytes each. */
typedef struct {
    _Alignas(16) unsigned char round_keys[15 * 16];
    _Alignas(16) unsigned char h_powers[4 * 16];
} pv_gcm_key;

/* The most associated data pv_gcm_open takes in its two parts together (pgveil's: a 32-byte header and a
 * column's or subject's associated data); callers use EVP beyond it. */
#define PV_GCM_MAX_AAD 1024

/* 1 when this build and CPU can run the fast path, else 0 (and *why says why). */
int pv_gcm_supported(const char **why);

/* Expands a 32-byte key. Only where pv_gcm_supported() said 1. */
void pv_gcm_init(pv_gcm_key *key, const unsigned char material[32]);

/* Verifies tag over aad1 . aad2 and the ciphertext under a 12-byte nonce, then decrypts into out (which
 * may not overlap the inputs). 0: authentic, plaintext in out; 1: the tag does not verify (out untouched);
 * -1: aad1_len + aad2_len > PV_GCM_MAX_AAD (nothing done, use EVP). */
int pv_gcm_open(const pv_gcm_key *key, const unsigned char nonce[12], const unsigned char *aad1, size_t aad1_len,
                const unsigned char *aad2, size_t aad2_len, const unsigned char *ciphertext, size_t ciphertext_len,
                const unsigned char tag[16], unsigned char *out);

/* Clears the key schedule and the GHASH key (not optimised away). */
void pv_gcm_wipe(pv_gcm_key *key);

#endif
