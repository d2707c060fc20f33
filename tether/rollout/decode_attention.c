/* Decode attention for the built-in sampler's lean path (tether/rollout/llama_decode.py), fused in one call.

   One new token per row attends over its cache: softmax(q K^T + bias) V, for every row and head at once. The
   PyTorch version of the same step is ~12 ops per layer over tiny per-sample matrices (2 query rows by 32
   dims on the tiny model), where each op costs more in dispatch than in arithmetic; here it is plain loops.
   tether/rollout/native.py compiles this file with the system C compiler on first use (no torch headers,
   under a second) and falls back to the PyTorch version when there is no compiler.

   Layout (floats, last dimension contiguous; every stride below is in floats):
   - rows b = u * n + j: the n samples of prompt u. q row b at q + b * q_row, head h * G + g (G query heads
     share kv head h), d floats each. out (B, kv * G * d), the same head order.
   - the shared part (the prompt's cache, read once per prompt): for prompt u and kv head h at
     u * p_u + h * p_h, keys transposed (d rows of p_ld floats: key t is column t) in pk, values (p_ld rows
     of d floats) in pv. P positions, additive bias pbias[u * pb_u + t] (0 or -inf; NULL for none).
   - the own part (each sample's completion so far): the same at u * c_u + h * c_h + j * c_j in ck / cv,
     c positions, leading dimension c_ld, no bias.
   Keys are read in blocks of 16 columns: p_ld and c_ld are multiples of 16 (the caches are padded).
   The new token's key and value, the kv heads after the query heads in its q row ([q | k | v], d floats per
   head), are first written to the last position read: the own part's (position c - 1), or with no own part
   (c = 0, one row per group: n = 1) the shared part's (position P - 1).
   S: scratch for n * G * (P + c) floats. */

#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
typedef float vf __attribute__((vector_size(32))); /* 8 floats; the compiler maps it to the machine's SIMD */
enum { W = 8, MAX_D = 256 };

INLINE vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }

/* exp(x) for x <= 0 in a form the compiler vectorizes: 2^k exp(r) with |r| <= ln 2 / 2 and exp(r) by its
   Taylor series to r^7 (relative error below 2e-7); 0 below -87 (where float exp underflows) and for -inf. */
INLINE float exp_nonpositive(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float k = __builtin_rintf(xc * 1.44269504f); /* x / ln 2 */
    float r = xc - k * 0.693145752f - k * 1.42860677e-6f; /* ln 2 split in two for an exact k ln 2 */
    float p = 1.0f + r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
              + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    int32_t bits = ((int32_t)k + 127) << 23; /* the float 2^k */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

/* S[r][t] = Q[r] . key t for r < R, t < L; keys transposed (kt[k * ld + t]). Two query rows by 16 keys at a
   time: four independent accumulators in registers. An odd last row is paired with itself. */
INLINE void scores(float *S, long s_ld, const float *const *Q, int R, const float *kt, long ld, int L, const int d) {
    for (int r = 0; r < R; r += 2) {
        int r1 = r + 1 < R ? r + 1 : r;
        const float *q0 = Q[r], *q1 = Q[r1];
        for (int t0 = 0; t0 < L; t0 += 2 * W) {
            vf a00 = splat(0), a01 = splat(0), a10 = splat(0), a11 = splat(0);
            for (int k = 0; k < d; k++) {
                vf k0 = load(kt + k * ld + t0), k1 = load(kt + k * ld + t0 + W);
                vf x0 = splat(q0[k]), x1 = splat(q1[k]);
                a00 += x0 * k0; a01 += x0 * k1; a10 += x1 * k0; a11 += x1 * k1;
            }
            float block[4 * W];
            store(block, a00); store(block + W, a01); store(block + 2 * W, a10); store(block + 3 * W, a11);
            int w = L - t0 < 2 * W ? L - t0 : 2 * W;
            memcpy(S + r * s_ld + t0, block, sizeof(float) * w);
            memcpy(S + r1 * s_ld + t0, block + 2 * W, sizeof(float) * w);
        }
    }
}

/* O[r] += sum_{t < L} S[r][t] V[t] for r < R (V: rows of d floats), two rows at a time, in registers. */
INLINE void weighted(float *const *O, const float *S, long s_ld, int R, const float *v, int L, const int d) {
    for (int r = 0; r < R; r += 2) {
        int r1 = r + 1 < R ? r + 1 : r;
        const float *w0 = S + r * s_ld, *w1 = S + r1 * s_ld;
        vf a0[MAX_D / W], a1[MAX_D / W];
        for (int i = 0; i < d / W; i++) a0[i] = a1[i] = splat(0);
        for (int t = 0; t < L; t++) {
            vf x0 = splat(w0[t]), x1 = splat(w1[t]);
            for (int i = 0; i < d / W; i++) {
                vf value = load(v + (long)t * d + i * W);
                a0[i] += x0 * value; a1[i] += x1 * value;
            }
        }
        for (int i = 0; i < d / W; i++) {
            store(O[r] + i * W, load(O[r] + i * W) + a0[i]);
            if (r1 != r) store(O[r1] + i * W, load(O[r1] + i * W) + a1[i]);
        }
    }
}

/* Softmax of each of the R rows of S (length L) in place, the bias added to its first P entries. */
INLINE void softmax_rows(float *S, int R, int L, const float *bias, int P) {
    for (int r = 0; r < R; r++) {
        float *s = S + (long)r * L, m = -3.0e38f, total = 0.0f;
        if (bias)
            for (int t = 0; t < P; t++) s[t] += bias[t];
        for (int t = 0; t < L; t++) m = s[t] > m ? s[t] : m;
#pragma omp simd reduction(+:total)
        for (int t = 0; t < L; t++) {
            s[t] = exp_nonpositive(s[t] - m);
            total += s[t];
        }
        float inv = 1.0f / total;
        for (int t = 0; t < L; t++) s[t] *= inv;
    }
}

/* Key (into keys transposed, leading dimension ld) and value (into rows of d) of one position. */
INLINE void write_position(float *kt, float *v, long ld, int position, const float *key, const float *value,
                           const int d) {
    for (int k = 0; k < d; k++) {
        kt[k * ld + position] = key[k];
        v[(long)position * d + k] = value[k];
    }
}

INLINE void attend(const float *q, long q_row, float *pk, float *pv, long p_u, long p_h, long p_ld,
                   int P, const float *pbias, long pb_u, float *ck, float *cv, long c_u, long c_h,
                   long c_j, long c_ld, int c, float *out, int U, int n, int kv, int G, const int d, float *S) {
    const int R = n * G, L = P + c; /* query rows per (prompt, kv head); positions each row attends to */
    const float *Q[R];
    float *O[R];
    for (int u = 0; u < U; u++)
        for (int h = 0; h < kv; h++) {
            long p_off = u * p_u + h * p_h;
            for (int j = 0; j < n; j++) {
                long b = (long)u * n + j, c_off = u * c_u + h * c_h + j * c_j;
                const float *key = q + b * q_row + (long)(kv * G + h) * d, *value = key + (long)kv * d;
                if (c > 0)
                    write_position(ck + c_off, cv + c_off, c_ld, c - 1, key, value, d);
                else
                    write_position(pk + p_off, pv + p_off, p_ld, P - 1, key, value, d);
                for (int g = 0; g < G; g++) {
                    Q[j * G + g] = q + b * q_row + (long)(h * G + g) * d;
                    O[j * G + g] = out + b * (long)(kv * G * d) + (long)(h * G + g) * d;
                    memset(O[j * G + g], 0, sizeof(float) * d);
                }
            }
            /* Row r's scores: S[r][0, P) over the prompt, S[r][P, L) over its own completion. */
            scores(S, L, Q, R, pk + p_off, p_ld, P, d);
            for (int j = 0; j < n; j++)
                scores(S + (long)j * G * L + P, L, Q + j * G, G, ck + u * c_u + h * c_h + j * c_j, c_ld, c, d);
            softmax_rows(S, R, L, pbias ? pbias + u * pb_u : NULL, P);
            weighted(O, S, L, R, pv + p_off, P, d);
            for (int j = 0; j < n; j++)
                weighted(O + j * G, S + (long)j * G * L + P, L, G, cv + u * c_u + h * c_h + j * c_j, c, d);
        }
}

/* Returns 0, or 1 for a head size this kernel does not take (a multiple of 8 up to 256). */
int decode_attention(const float *q, long q_row, float *pk, float *pv, long p_u, long p_h, long p_ld,
                     int P, const float *pbias, long pb_u, float *ck, float *cv, long c_u, long c_h,
                     long c_j, long c_ld, int c, float *out, int U, int n, int kv, int G, int d, float *S) {
    if (d > MAX_D || d % W)
        return 1;
#define ATTEND(D) attend(q, q_row, pk, pv, p_u, p_h, p_ld, P, pbias, pb_u, ck, cv, c_u, c_h, c_j, c_ld, c, out, \
                         U, n, kv, G, D, S)
    switch (d) { /* the usual head sizes as constants: their loops unroll and stay in registers */
        case 32: ATTEND(32); break;
        case 64: ATTEND(64); break;
        case 128: ATTEND(128); break;
        default: ATTEND(d);
    }
    return 0;
}
