/* Synchronized batch norm's CPU passes, one call per pass (gan/nn/batchnorm_kernels.py builds
 * this with the system's C compiler and calls it through ctypes).
 *
 * In torch, each layer's per-channel bookkeeping (statistics to sums, sums to mean and variance,
 * the running statistics, the backward's correction) takes about fifty small operators a
 * forward and backward, each of which costs several times its back-to-back time right after a
 * convolution (docs/benchmarks.md). Here a forward is three calls and a backward two, around
 * the exchange of the sums between ranks.
 *
 * Layout: x is contiguous (N, C, S), S the product of the spatial sizes. Sums and statistics
 * are float64 whatever the data's type, as gan/nn/sync_batchnorm.py's torch path keeps them.
 * No Python API: plain C99 and libm, so any C compiler builds it.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* sums[0:C] = sum(x), sums[C:2C] = sum(x*x), sums[2C] = N*S, per channel. The local mean is
 * taken first and the squares centered on it, then shifted back in float64: a plain
 * sum(x*x) - n*mean^2 loses digits whenever |mean| >> std. */
#define LOCAL_SUMS(T, NAME)                                                                     \
    void NAME(const T *x, int64_t n, int64_t c, int64_t s, double *sums) {                      \
        const double count = (double)(n * s);                                                   \
        for (int64_t ch = 0; ch < c; ch++) {                                                    \
            double total = 0.0;                                                                 \
            for (int64_t i = 0; i < n; i++) {                                                   \
                const T *row = x + (i * c + ch) * s;                                            \
                for (int64_t j = 0; j < s; j++) total += (double)row[j];                        \
            }                                                                                   \
            const double mean = count > 0 ? total / count : 0.0;                                \
            double centered = 0.0;                                                              \
            for (int64_t i = 0; i < n; i++) {                                                   \
                const T *row = x + (i * c + ch) * s;                                            \
                for (int64_t j = 0; j < s; j++) {                                               \
                    const double d = (double)row[j] - mean;                                     \
                    centered += d * d;                                                          \
                }                                                                               \
            }                                                                                   \
            sums[ch] = total;                                                                   \
            sums[c + ch] = centered + count * mean * mean;                                      \
        }                                                                                       \
        sums[2 * c] = count;                                                                    \
    }

/* From the global sums: stats[0:C] = mean, stats[C:2C] = 1 / sqrt(biased variance + eps), and
 * the running statistics (may be NULL) moved towards the mean and the unbiased variance.
 * Returns the global count; with a count of 1 or less nothing is written (the caller fails). */
#define FINISH_STATS(T, NAME)                                                                   \
    double NAME(const double *sums, int64_t c, double eps, double momentum, T *running_mean,   \
                T *running_var, double *stats) {                                                \
        const double count = sums[2 * c];                                                       \
        if (count <= 1.0) return count;                                                         \
        for (int64_t ch = 0; ch < c; ch++) {                                                    \
            const double mean = sums[ch] / count;                                               \
            double var = sums[c + ch] / count - mean * mean;                                    \
            if (var < 0.0) var = 0.0;                                                           \
            stats[ch] = mean;                                                                   \
            stats[c + ch] = 1.0 / sqrt(var + eps);                                              \
            if (running_mean != NULL && running_var != NULL) {                                  \
                const double unbiased = var * (count / (count - 1.0));                          \
                running_mean[ch] =                                                              \
                    (T)((1.0 - momentum) * (double)running_mean[ch] + momentum * mean);         \
                running_var[ch] =                                                               \
                    (T)((1.0 - momentum) * (double)running_var[ch] + momentum * unbiased);      \
            }                                                                                   \
        }                                                                                       \
        return count;                                                                           \
    }

/* out = (x - mean) * invstd * weight + bias; weight and bias may be NULL. */
#define NORMALIZE(T, NAME)                                                                      \
    void NAME(const T *x, T *out, int64_t n, int64_t c, int64_t s, const double *stats,        \
              const T *weight, const T *bias) {                                                 \
        for (int64_t ch = 0; ch < c; ch++) {                                                    \
            const double mean = stats[ch];                                                      \
            const double scale = stats[c + ch] * (weight != NULL ? (double)weight[ch] : 1.0);   \
            const double shift = bias != NULL ? (double)bias[ch] : 0.0;                         \
            for (int64_t i = 0; i < n; i++) {                                                   \
                const T *row = x + (i * c + ch) * s;                                            \
                T *row_out = out + (i * c + ch) * s;                                            \
                for (int64_t j = 0; j < s; j++)                                                 \
                    row_out[j] = (T)(((double)row[j] - mean) * scale + shift);                  \
            }                                                                                   \
        }                                                                                       \
    }

/* sums[0:C] = sum(dy), sums[C:2C] = sum(dy * x_hat): the local bias and weight gradients
 * (also written to grad_bias and grad_weight in the data's type, each may be NULL) and what
 * the ranks exchange. */
#define BACKWARD_SUMS(T, NAME)                                                                  \
    void NAME(const T *dy, const T *x, int64_t n, int64_t c, int64_t s, const double *stats,   \
              double *sums, T *grad_weight, T *grad_bias) {                                     \
        for (int64_t ch = 0; ch < c; ch++) {                                                    \
            const double mean = stats[ch];                                                      \
            double sum_dy = 0.0, sum_dy_centered = 0.0;                                         \
            for (int64_t i = 0; i < n; i++) {                                                   \
                const T *row = x + (i * c + ch) * s;                                            \
                const T *row_dy = dy + (i * c + ch) * s;                                        \
                for (int64_t j = 0; j < s; j++) {                                               \
                    sum_dy += (double)row_dy[j];                                                \
                    sum_dy_centered += (double)row_dy[j] * ((double)row[j] - mean);             \
                }                                                                               \
            }                                                                                   \
            sums[ch] = sum_dy;                                                                  \
            sums[c + ch] = sum_dy_centered * stats[c + ch];                                     \
            if (grad_bias != NULL) grad_bias[ch] = (T)sums[ch];                                 \
            if (grad_weight != NULL) grad_weight[ch] = (T)sums[c + ch];                         \
        }                                                                                       \
    }

/* dx = invstd * weight * (dy - sum(dy) / count - x_hat * sum(dy * x_hat) / count), with the
 * sums over every rank. */
#define BACKWARD_INPUT(T, NAME)                                                                 \
    void NAME(const T *dy, const T *x, T *dx, int64_t n, int64_t c, int64_t s,                 \
              const double *stats, const T *weight, const double *sums, double count) {         \
        for (int64_t ch = 0; ch < c; ch++) {                                                    \
            const double mean = stats[ch], invstd = stats[c + ch];                              \
            const double scale = invstd * (weight != NULL ? (double)weight[ch] : 1.0);          \
            const double mean_dy = sums[ch] / count;                                            \
            const double slope = invstd * sums[c + ch] / count;                                 \
            for (int64_t i = 0; i < n; i++) {                                                   \
                const T *row = x + (i * c + ch) * s;                                            \
                const T *row_dy = dy + (i * c + ch) * s;                                        \
                T *row_dx = dx + (i * c + ch) * s;                                              \
                for (int64_t j = 0; j < s; j++)                                                 \
                    row_dx[j] = (T)(scale * ((double)row_dy[j] - mean_dy -                      \
                                             ((double)row[j] - mean) * slope));                 \
            }                                                                                   \
        }                                                                                       \
    }

LOCAL_SUMS(float, local_sums_f32)
LOCAL_SUMS(double, local_sums_f64)
FINISH_STATS(float, finish_stats_f32)
FINISH_STATS(double, finish_stats_f64)
NORMALIZE(float, normalize_f32)
NORMALIZE(double, normalize_f64)
BACKWARD_SUMS(float, backward_sums_f32)
BACKWARD_SUMS(double, backward_sums_f64)
BACKWARD_INPUT(float, backward_input_f32)
BACKWARD_INPUT(double, backward_input_f64)
