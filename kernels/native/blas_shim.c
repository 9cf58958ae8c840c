/* Standard CBLAS names forwarded to scipy-openblas32's prefixed symbols.
 *
 * The mlx-cpu wheel links a reference BLAS. Loading this library with
 * RTLD_GLOBAL before libmlx.so makes MLX's cblas_* calls resolve here
 * first, and from here into OpenBLAS. The scipy_* symbols are resolved at
 * load time from libscipy_openblas.so, which mobileo_mlx._blas loads
 * (also RTLD_GLOBAL) just before this file.
 */
typedef int blas_int;

extern void scipy_cblas_sgemm(int, int, int, blas_int, blas_int, blas_int, float,
                              const float *, blas_int, const float *, blas_int,
                              float, float *, blas_int);
extern void scipy_cblas_dgemm(int, int, int, blas_int, blas_int, blas_int, double,
                              const double *, blas_int, const double *, blas_int,
                              double, double *, blas_int);
extern void scipy_cblas_cgemm(int, int, int, blas_int, blas_int, blas_int,
                              const void *, const void *, blas_int, const void *,
                              blas_int, const void *, void *, blas_int);

void cblas_sgemm(int order, int ta, int tb, blas_int m, blas_int n, blas_int k,
                 float alpha, const float *a, blas_int lda, const float *b,
                 blas_int ldb, float beta, float *c, blas_int ldc) {
  scipy_cblas_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int ta, int tb, blas_int m, blas_int n, blas_int k,
                 double alpha, const double *a, blas_int lda, const double *b,
                 blas_int ldb, double beta, double *c, blas_int ldc) {
  scipy_cblas_dgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_cgemm(int order, int ta, int tb, blas_int m, blas_int n, blas_int k,
                 const void *alpha, const void *a, blas_int lda, const void *b,
                 blas_int ldb, const void *beta, void *c, blas_int ldc) {
  scipy_cblas_cgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* Lets Python confirm which library answered. */
const char *mobileo_blas_shim_target(void) { return "scipy-openblas32"; }
