// langfield native renderer: the math shared by the CPU and CUDA drivers.
//
// Every function here is LF_HD: `__host__ __device__` under nvcc, plain
// `inline` under g++. The drivers only decide how work is mapped to threads;
// what is computed for one (camera, Gaussian) pair or one (pixel, Gaussian)
// pair lives here, once.
//
// Matrices are row-major float[9] / float[4]; the math follows gsplat 1.5.3's
// conventions (see langfield_abi.h) and is written from the equations, not
// from any other code base.
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define LF_HD __host__ __device__ __forceinline__
#else
#define LF_HD inline
#endif

namespace lf {

constexpr float ALPHA_THRESHOLD = 1.0f / 255.0f;
constexpr float ALPHA_MAX = 0.999f;
constexpr float T_MIN = 1e-4f;
constexpr float EXTEND_MAX = 3.33f;

struct v2 { float x, y; };
struct v3 { float x, y, z; };
struct m2 { float a[4]; };   // row-major 2x2
struct m3 { float a[9]; };   // row-major 3x3

LF_HD float lf_min(float a, float b) { return a < b ? a : b; }
LF_HD float lf_max(float a, float b) { return a > b ? a : b; }

LF_HD m3 m3_zero() { m3 r; for (int i = 0; i < 9; ++i) r.a[i] = 0.f; return r; }
LF_HD m2 m2_zero() { m2 r; for (int i = 0; i < 4; ++i) r.a[i] = 0.f; return r; }

LF_HD m3 m3_mul(const m3 &A, const m3 &B) {
    m3 r;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            r.a[i * 3 + j] = A.a[i * 3 + 0] * B.a[0 * 3 + j] +
                             A.a[i * 3 + 1] * B.a[1 * 3 + j] +
                             A.a[i * 3 + 2] * B.a[2 * 3 + j];
    return r;
}
LF_HD m3 m3_transpose(const m3 &A) {
    m3 r;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) r.a[i * 3 + j] = A.a[j * 3 + i];
    return r;
}
// A * B^T
LF_HD m3 m3_mul_bt(const m3 &A, const m3 &B) { return m3_mul(A, m3_transpose(B)); }
// A^T * B
LF_HD m3 m3_mul_at(const m3 &A, const m3 &B) { return m3_mul(m3_transpose(A), B); }
LF_HD m3 m3_add(const m3 &A, const m3 &B) {
    m3 r; for (int i = 0; i < 9; ++i) r.a[i] = A.a[i] + B.a[i]; return r;
}
LF_HD v3 m3_mulv(const m3 &A, v3 v) {
    return {A.a[0] * v.x + A.a[1] * v.y + A.a[2] * v.z,
            A.a[3] * v.x + A.a[4] * v.y + A.a[5] * v.z,
            A.a[6] * v.x + A.a[7] * v.y + A.a[8] * v.z};
}
LF_HD v3 m3_tmulv(const m3 &A, v3 v) {  // A^T v
    return {A.a[0] * v.x + A.a[3] * v.y + A.a[6] * v.z,
            A.a[1] * v.x + A.a[4] * v.y + A.a[7] * v.z,
            A.a[2] * v.x + A.a[5] * v.y + A.a[8] * v.z};
}

// ------------------------------------------------------------ quaternions
// q = (w, x, y, z), normalised here (a zero quaternion gives the identity).
LF_HD float quat_norm_inv(const float *q) {
    float n = sqrtf(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
    return 1.f / lf_max(n, 1e-12f);
}

LF_HD m3 quat_to_rotmat(const float *q) {
    float inv = quat_norm_inv(q);
    float w = q[0] * inv, x = q[1] * inv, y = q[2] * inv, z = q[3] * inv;
    m3 R;
    R.a[0] = 1.f - 2.f * (y * y + z * z);
    R.a[1] = 2.f * (x * y - w * z);
    R.a[2] = 2.f * (x * z + w * y);
    R.a[3] = 2.f * (x * y + w * z);
    R.a[4] = 1.f - 2.f * (x * x + z * z);
    R.a[5] = 2.f * (y * z - w * x);
    R.a[6] = 2.f * (x * z - w * y);
    R.a[7] = 2.f * (y * z + w * x);
    R.a[8] = 1.f - 2.f * (x * x + y * y);
    return R;
}

// d loss / d q (unnormalised q) from d loss / d R.
LF_HD void quat_to_rotmat_vjp(const float *q, const m3 &vR, float *v_q) {
    float inv = quat_norm_inv(q);
    float w = q[0] * inv, x = q[1] * inv, y = q[2] * inv, z = q[3] * inv;
    const float *g = vR.a;
    float vw = 2.f * (x * (g[7] - g[5]) + y * (g[2] - g[6]) + z * (g[3] - g[1]));
    float vx = 2.f * (-2.f * x * (g[4] + g[8]) + y * (g[1] + g[3]) + z * (g[2] + g[6]) + w * (g[7] - g[5]));
    float vy = 2.f * (x * (g[1] + g[3]) - 2.f * y * (g[0] + g[8]) + z * (g[5] + g[7]) + w * (g[2] - g[6]));
    float vz = 2.f * (x * (g[2] + g[6]) + y * (g[5] + g[7]) - 2.f * z * (g[0] + g[4]) + w * (g[3] - g[1]));
    // through the normalisation qn = q / |q|
    float dot = w * vw + x * vx + y * vy + z * vz;
    v_q[0] = (vw - w * dot) * inv;
    v_q[1] = (vx - x * dot) * inv;
    v_q[2] = (vy - y * dot) * inv;
    v_q[3] = (vz - z * dot) * inv;
}

// Sigma = (R S)(R S)^T, S = diag(s).
LF_HD m3 quat_scale_to_covar(const float *q, const float *s, m3 *R_out) {
    m3 R = quat_to_rotmat(q);
    m3 M;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) M.a[i * 3 + j] = R.a[i * 3 + j] * s[j];
    if (R_out) *R_out = R;
    return m3_mul_bt(M, M);
}

LF_HD void quat_scale_to_covar_vjp(const float *q, const float *s, const m3 &R,
                                   const m3 &v_covar, float *v_q, float *v_s) {
    m3 M;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) M.a[i * 3 + j] = R.a[i * 3 + j] * s[j];
    // v_M = (v_Sigma + v_Sigma^T) M
    m3 vsym = m3_add(v_covar, m3_transpose(v_covar));
    m3 vM = m3_mul(vsym, M);
    m3 vR;
    for (int j = 0; j < 3; ++j) {
        float acc = 0.f;
        for (int i = 0; i < 3; ++i) {
            vR.a[i * 3 + j] = vM.a[i * 3 + j] * s[j];
            acc += R.a[i * 3 + j] * vM.a[i * 3 + j];
        }
        v_s[j] = acc;
    }
    quat_to_rotmat_vjp(q, vR, v_q);
}

// ----------------------------------------------------------- camera frames
LF_HD void viewmat_split(const float *viewmat, m3 &R, v3 &t) {
    R.a[0] = viewmat[0]; R.a[1] = viewmat[1]; R.a[2] = viewmat[2];
    R.a[3] = viewmat[4]; R.a[4] = viewmat[5]; R.a[5] = viewmat[6];
    R.a[6] = viewmat[8]; R.a[7] = viewmat[9]; R.a[8] = viewmat[10];
    t = {viewmat[3], viewmat[7], viewmat[11]};
}

// --------------------------------------------------------- pinhole EWA proj
struct Intrinsics { float fx, fy, cx, cy; };

LF_HD Intrinsics intrinsics_from_K(const float *K) { return {K[0], K[4], K[2], K[5]}; }

// Screen-space mean and the 2D covariance J Sigma_c J^T, with gsplat's
// frustum clamp of x/z, y/z to 1.3x the half field of view.
LF_HD void persp_proj(v3 p, const m3 &cov, Intrinsics in, int width, int height,
                      m2 &cov2d, v2 &mean2d) {
    float tan_fovx = 0.5f * width / in.fx, tan_fovy = 0.5f * height / in.fy;
    float lim_x_pos = (width - in.cx) / in.fx + 0.3f * tan_fovx;
    float lim_x_neg = in.cx / in.fx + 0.3f * tan_fovx;
    float lim_y_pos = (height - in.cy) / in.fy + 0.3f * tan_fovy;
    float lim_y_neg = in.cy / in.fy + 0.3f * tan_fovy;
    float rz = 1.f / p.z, rz2 = rz * rz;
    float tx = p.z * lf_min(lim_x_pos, lf_max(-lim_x_neg, p.x * rz));
    float ty = p.z * lf_min(lim_y_pos, lf_max(-lim_y_neg, p.y * rz));
    // J is 2x3: [fx/z, 0, -fx tx/z^2; 0, fy/z, -fy ty/z^2]
    float J[6] = {in.fx * rz, 0.f, -in.fx * tx * rz2, 0.f, in.fy * rz, -in.fy * ty * rz2};
    float JS[6];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 3; ++j)
            JS[i * 3 + j] = J[i * 3 + 0] * cov.a[0 * 3 + j] + J[i * 3 + 1] * cov.a[1 * 3 + j] +
                            J[i * 3 + 2] * cov.a[2 * 3 + j];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            cov2d.a[i * 2 + j] = JS[i * 3 + 0] * J[j * 3 + 0] + JS[i * 3 + 1] * J[j * 3 + 1] +
                                 JS[i * 3 + 2] * J[j * 3 + 2];
    mean2d = {in.fx * p.x * rz + in.cx, in.fy * p.y * rz + in.cy};
}

LF_HD void persp_proj_vjp(v3 p, const m3 &cov, Intrinsics in, int width, int height,
                          const m2 &v_cov2d, v2 v_mean2d, v3 &v_p, m3 &v_cov) {
    float tan_fovx = 0.5f * width / in.fx, tan_fovy = 0.5f * height / in.fy;
    float lim_x_pos = (width - in.cx) / in.fx + 0.3f * tan_fovx;
    float lim_x_neg = in.cx / in.fx + 0.3f * tan_fovx;
    float lim_y_pos = (height - in.cy) / in.fy + 0.3f * tan_fovy;
    float lim_y_neg = in.cy / in.fy + 0.3f * tan_fovy;
    float rz = 1.f / p.z, rz2 = rz * rz, rz3 = rz2 * rz;
    float ux = p.x * rz, uy = p.y * rz;
    bool in_x = (ux <= lim_x_pos) && (ux >= -lim_x_neg);
    bool in_y = (uy <= lim_y_pos) && (uy >= -lim_y_neg);
    float tx = p.z * lf_min(lim_x_pos, lf_max(-lim_x_neg, ux));
    float ty = p.z * lf_min(lim_y_pos, lf_max(-lim_y_neg, uy));
    float J[6] = {in.fx * rz, 0.f, -in.fx * tx * rz2, 0.f, in.fy * rz, -in.fy * ty * rz2};
    // v_cov = J^T v_cov2d J
    float VJ[6];  // v_cov2d (2x2) * J (2x3)
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 3; ++j)
            VJ[i * 3 + j] = v_cov2d.a[i * 2 + 0] * J[0 * 3 + j] + v_cov2d.a[i * 2 + 1] * J[1 * 3 + j];
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            v_cov.a[i * 3 + j] = J[0 * 3 + i] * VJ[0 * 3 + j] + J[1 * 3 + i] * VJ[1 * 3 + j];
    // v_J = v_cov2d J cov^T + v_cov2d^T J cov = (v + v^T) J cov (cov symmetric)
    float vs[4] = {2.f * v_cov2d.a[0], v_cov2d.a[1] + v_cov2d.a[2], v_cov2d.a[1] + v_cov2d.a[2],
                   2.f * v_cov2d.a[3]};
    float JC[6];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 3; ++j)
            JC[i * 3 + j] = J[i * 3 + 0] * cov.a[0 * 3 + j] + J[i * 3 + 1] * cov.a[1 * 3 + j] +
                            J[i * 3 + 2] * cov.a[2 * 3 + j];
    float vJ[6];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 3; ++j) vJ[i * 3 + j] = vs[i * 2 + 0] * JC[0 * 3 + j] + vs[i * 2 + 1] * JC[1 * 3 + j];
    // mean2d = (fx x/z + cx, fy y/z + cy)
    v_p.x = in.fx * rz * v_mean2d.x;
    v_p.y = in.fy * rz * v_mean2d.y;
    v_p.z = -(in.fx * p.x * v_mean2d.x + in.fy * p.y * v_mean2d.y) * rz2;
    // J entries: J00 = fx/z, J11 = fy/z, J02 = -fx tx/z^2, J12 = -fy ty/z^2
    v_p.z += -in.fx * rz2 * vJ[0] - in.fy * rz2 * vJ[4];
    if (in_x) {  // tx = x: J02 = -fx x / z^2
        v_p.x += -in.fx * rz2 * vJ[2];
        v_p.z += 2.f * in.fx * tx * rz3 * vJ[2];
    } else {     // tx = z L: J02 = -fx L / z
        v_p.z += in.fx * tx * rz3 * vJ[2];
    }
    if (in_y) {
        v_p.y += -in.fy * rz2 * vJ[5];
        v_p.z += 2.f * in.fy * ty * rz3 * vJ[5];
    } else {
        v_p.z += in.fy * ty * rz3 * vJ[5];
    }
}

// ------------------------------------------------------------- 2D helpers
// Adds eps2d to the diagonal; returns the determinant after the blur and the
// antialiasing compensation sqrt(max(0, det_before / det_after)).
LF_HD float add_blur(float eps2d, m2 &cov2d, float &compensation) {
    float det_orig = cov2d.a[0] * cov2d.a[3] - cov2d.a[1] * cov2d.a[2];
    cov2d.a[0] += eps2d;
    cov2d.a[3] += eps2d;
    float det_blur = cov2d.a[0] * cov2d.a[3] - cov2d.a[1] * cov2d.a[2];
    compensation = sqrtf(lf_max(0.f, det_orig / det_blur));
    return det_blur;
}

// cov2d_blur_inv is the conic (inverse of the blurred covariance).
LF_HD void add_blur_vjp(float eps2d, const m2 &conic, float compensation, float v_comp, m2 &v_cov2d) {
    // d comp / d Sigma = 0.5 comp [ (Sigma_blur - eps I)^-1 - Sigma_blur^-1 ]
    float det_c = conic.a[0] * conic.a[3] - conic.a[1] * conic.a[2];
    // Sigma_blur = conic^-1
    float sb[4] = {conic.a[3] / det_c, -conic.a[1] / det_c, -conic.a[2] / det_c, conic.a[0] / det_c};
    float so[4] = {sb[0] - eps2d, sb[1], sb[2], sb[3] - eps2d};
    float det_o = so[0] * so[3] - so[1] * so[2];
    if (!(compensation > 0.f) || det_o == 0.f) return;
    float io[4] = {so[3] / det_o, -so[1] / det_o, -so[2] / det_o, so[0] / det_o};
    float f = 0.5f * compensation * v_comp;
    for (int i = 0; i < 4; ++i) v_cov2d.a[i] += f * (io[i] - conic.a[i]);
}

// v_Sigma = -Sigma^-T v_inv Sigma^-T for inv = Sigma^-1 (here inv symmetric).
LF_HD void inverse2_vjp(const m2 &inv, const m2 &v_inv, m2 &v_cov) {
    float t[4];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) t[i * 2 + j] = inv.a[i * 2 + 0] * v_inv.a[0 * 2 + j] + inv.a[i * 2 + 1] * v_inv.a[1 * 2 + j];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            v_cov.a[i * 2 + j] += -(t[i * 2 + 0] * inv.a[0 * 2 + j] + t[i * 2 + 1] * inv.a[1 * 2 + j]);
}

// ------------------------------------------------- one (camera, Gaussian) pair
struct ProjOut {
    int32_t rx, ry;      // 0, 0 when culled
    v2 mean2d;
    float depth;
    float conic[3];
    float compensation;
};

LF_HD ProjOut project_one(const float *mean, const float *quat, const float *scale,
                          const float *opacity /*nullable*/, const float *viewmat, const float *K,
                          int width, int height, float eps2d, float near_plane, float far_plane,
                          float radius_clip, bool with_compensation) {
    ProjOut o;
    o.rx = 0; o.ry = 0;
    o.mean2d = {0.f, 0.f}; o.depth = 0.f;
    o.conic[0] = o.conic[1] = o.conic[2] = 0.f;
    o.compensation = 0.f;
    m3 Rw; v3 t;
    viewmat_split(viewmat, Rw, t);
    v3 m = {mean[0], mean[1], mean[2]};
    v3 p = m3_mulv(Rw, m);
    p.x += t.x; p.y += t.y; p.z += t.z;
    // NaN-safe: a NaN depth fails both comparisons' negation below
    if (!(p.z >= near_plane && p.z <= far_plane)) return o;
    m3 covar = quat_scale_to_covar(quat, scale, nullptr);
    m3 cov_c = m3_mul_bt(m3_mul(Rw, covar), Rw);
    m2 cov2d; v2 mean2d;
    persp_proj(p, cov_c, intrinsics_from_K(K), width, height, cov2d, mean2d);
    float comp;
    float det = add_blur(eps2d, cov2d, comp);
    if (!(det > 0.f)) return o;
    float inv_det = 1.f / det;
    float ca = cov2d.a[3] * inv_det, cb = -cov2d.a[1] * inv_det, cc = cov2d.a[0] * inv_det;
    float extend = EXTEND_MAX;
    if (opacity) {
        float op = *opacity;
        if (with_compensation) op *= comp;
        if (!(op >= ALPHA_THRESHOLD)) return o;
        extend = lf_min(extend, sqrtf(2.f * logf(op / ALPHA_THRESHOLD)));
    }
    float radius_x = ceilf(extend * sqrtf(cov2d.a[0]));
    float radius_y = ceilf(extend * sqrtf(cov2d.a[3]));
    if (radius_x <= radius_clip && radius_y <= radius_clip) return o;
    if (!(mean2d.x + radius_x > 0.f && mean2d.x - radius_x < (float)width &&
          mean2d.y + radius_y > 0.f && mean2d.y - radius_y < (float)height))
        return o;
    // huge screen radii (degenerate scales) stay representable; tile bounds
    // are clamped to the image anyway
    const float rmax = 1e7f;
    o.rx = (int32_t)lf_min(radius_x, rmax);
    o.ry = (int32_t)lf_min(radius_y, rmax);
    o.mean2d = mean2d;
    o.depth = p.z;
    o.conic[0] = ca; o.conic[1] = cb; o.conic[2] = cc;
    o.compensation = comp;
    return o;
}

struct ProjGrad {
    float v_mean[3];
    float v_quat[4];
    float v_scale[3];
    float v_viewmat[16];
};

LF_HD void project_one_vjp(const float *mean, const float *quat, const float *scale,
                           const float *viewmat, const float *K, int width, int height,
                           float eps2d, const float *conic, const float *compensation /*nullable*/,
                           const float *v_mean2d, float v_depth, const float *v_conic,
                           const float *v_compensation /*nullable*/, ProjGrad &g,
                           bool with_viewmat = true) {
    m2 inv;
    inv.a[0] = conic[0]; inv.a[1] = conic[1]; inv.a[2] = conic[1]; inv.a[3] = conic[2];
    m2 v_inv;
    v_inv.a[0] = v_conic[0]; v_inv.a[1] = 0.5f * v_conic[1]; v_inv.a[2] = 0.5f * v_conic[1]; v_inv.a[3] = v_conic[2];
    m2 v_cov2d = m2_zero();
    inverse2_vjp(inv, v_inv, v_cov2d);
    if (v_compensation && compensation)
        add_blur_vjp(eps2d, inv, *compensation, *v_compensation, v_cov2d);

    m3 Rw; v3 t;
    viewmat_split(viewmat, Rw, t);
    v3 m = {mean[0], mean[1], mean[2]};
    v3 p = m3_mulv(Rw, m);
    p.x += t.x; p.y += t.y; p.z += t.z;
    m3 Rq;
    m3 covar = quat_scale_to_covar(quat, scale, &Rq);
    m3 RS = m3_mul(Rw, covar);
    m3 cov_c = m3_mul_bt(RS, Rw);

    v3 v_p; m3 v_cov_c;
    persp_proj_vjp(p, cov_c, intrinsics_from_K(K), width, height, v_cov2d,
                   v2{v_mean2d[0], v_mean2d[1]}, v_p, v_cov_c);
    v_p.z += v_depth;

    // p = Rw m + t
    v3 vm = m3_tmulv(Rw, v_p);
    g.v_mean[0] = vm.x; g.v_mean[1] = vm.y; g.v_mean[2] = vm.z;
    m3 v_covar = m3_mul(m3_mul_at(Rw, v_cov_c), Rw);
    quat_scale_to_covar_vjp(quat, scale, Rq, v_covar, g.v_quat, g.v_scale);
    if (!with_viewmat) return;  // g.v_viewmat left unset: the caller does not want it
    float vp[3] = {v_p.x, v_p.y, v_p.z};
    float mm[3] = {m.x, m.y, m.z};
    m3 vRw;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) vRw.a[i * 3 + j] = vp[i] * mm[j];
    // cov_c = Rw Sigma Rw^T: v_Rw += v_cov_c Rw Sigma^T + v_cov_c^T Rw Sigma
    m3 a1 = m3_mul(m3_mul(v_cov_c, Rw), m3_transpose(covar));
    m3 a2 = m3_mul(m3_mul(m3_transpose(v_cov_c), Rw), covar);
    vRw = m3_add(vRw, m3_add(a1, a2));
    for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) g.v_viewmat[i * 4 + j] = vRw.a[i * 3 + j];
        g.v_viewmat[i * 4 + 3] = vp[i];
    }
    g.v_viewmat[12] = g.v_viewmat[13] = g.v_viewmat[14] = g.v_viewmat[15] = 0.f;
}

// --------------------------------------------------------------- tiles
// Tile rectangle [x0, x1) x [y0, y1) covered by a projected Gaussian.
LF_HD void tile_bounds(v2 mean2d, int32_t rx, int32_t ry, int tile_size, int tile_w, int tile_h,
                       int &x0, int &x1, int &y0, int &y1) {
    float tx = mean2d.x / tile_size, ty = mean2d.y / tile_size;
    float trx = (float)rx / tile_size, try_ = (float)ry / tile_size;
    float fx0 = floorf(tx - trx), fx1 = ceilf(tx + trx);
    float fy0 = floorf(ty - try_), fy1 = ceilf(ty + try_);
    x0 = (int)lf_min(lf_max(fx0, 0.f), (float)tile_w);
    x1 = (int)lf_min(lf_max(fx1, 0.f), (float)tile_w);
    y0 = (int)lf_min(lf_max(fy0, 0.f), (float)tile_h);
    y1 = (int)lf_min(lf_max(fy1, 0.f), (float)tile_h);
}

// ---------------------------------------------------- per-pixel evaluation
// sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with d = mean2d - pixel centre.
LF_HD float gauss_sigma(const float *conic, float dx, float dy) {
    return 0.5f * (conic[0] * dx * dx + conic[2] * dy * dy) + conic[1] * dx * dy;
}

// Accumulates the gradient of one (pixel, Gaussian) blend step given
// d loss / d alpha. vis = exp(-sigma), alpha = min(0.999, opacity * vis).
LF_HD void alpha_vjp(const float *conic, float opacity, float vis, float dx, float dy,
                     float v_alpha, float *v_xy, float *v_xy_abs, float *v_conic, float &v_opac) {
    if (opacity * vis > ALPHA_MAX) return;  // clamped: no gradient
    float v_sigma = -opacity * vis * v_alpha;
    v_conic[0] += 0.5f * v_sigma * dx * dx;
    v_conic[1] += v_sigma * dx * dy;
    v_conic[2] += 0.5f * v_sigma * dy * dy;
    float gx = v_sigma * (conic[0] * dx + conic[1] * dy);
    float gy = v_sigma * (conic[1] * dx + conic[2] * dy);
    v_xy[0] += gx;
    v_xy[1] += gy;
    if (v_xy_abs) {
        v_xy_abs[0] += fabsf(gx);
        v_xy_abs[1] += fabsf(gy);
    }
    v_opac += vis * v_alpha;
}

// ---------------------------------------------------- spherical harmonics
constexpr float SH_C0 = 0.28209479177387814f;
constexpr float SH_C1 = 0.4886025119029199f;
constexpr float SH_C2_0 = 1.0925484305920792f;
constexpr float SH_C2_1 = -1.0925484305920792f;
constexpr float SH_C2_2 = 0.31539156525252005f;
constexpr float SH_C2_3 = -1.0925484305920792f;
constexpr float SH_C2_4 = 0.5462742152960396f;
constexpr float SH_C3_0 = -0.5900435899266435f;
constexpr float SH_C3_1 = 2.890611442640554f;
constexpr float SH_C3_2 = -0.4570457994644658f;
constexpr float SH_C3_3 = 0.3731763325901154f;
constexpr float SH_C3_4 = -0.4570457994644658f;
constexpr float SH_C3_5 = 1.445305721320277f;
constexpr float SH_C3_6 = -0.5900435899266435f;

// Basis values Y_k(d) for a unit direction, k < (degree+1)^2 <= 16.
LF_HD void sh_basis(int degree, float x, float y, float z, float *b) {
    b[0] = SH_C0;
    if (degree < 1) return;
    b[1] = -SH_C1 * y;
    b[2] = SH_C1 * z;
    b[3] = -SH_C1 * x;
    if (degree < 2) return;
    float xx = x * x, yy = y * y, zz = z * z, xy = x * y, yz = y * z, xz = x * z;
    b[4] = SH_C2_0 * xy;
    b[5] = SH_C2_1 * yz;
    b[6] = SH_C2_2 * (2.f * zz - xx - yy);
    b[7] = SH_C2_3 * xz;
    b[8] = SH_C2_4 * (xx - yy);
    if (degree < 3) return;
    b[9] = SH_C3_0 * y * (3.f * xx - yy);
    b[10] = SH_C3_1 * xy * z;
    b[11] = SH_C3_2 * y * (4.f * zz - xx - yy);
    b[12] = SH_C3_3 * z * (2.f * zz - 3.f * xx - 3.f * yy);
    b[13] = SH_C3_4 * x * (4.f * zz - xx - yy);
    b[14] = SH_C3_5 * z * (xx - yy);
    b[15] = SH_C3_6 * x * (xx - 3.f * yy);
}

// d b_k / d (x, y, z): jac[k*3 + {0,1,2}].
LF_HD void sh_basis_jac(int degree, float x, float y, float z, float *jac) {
    for (int i = 0; i < 48; ++i) jac[i] = 0.f;
    if (degree < 1) return;
    jac[1 * 3 + 1] = -SH_C1;
    jac[2 * 3 + 2] = SH_C1;
    jac[3 * 3 + 0] = -SH_C1;
    if (degree < 2) return;
    float xx = x * x, yy = y * y, zz = z * z;
    jac[4 * 3 + 0] = SH_C2_0 * y; jac[4 * 3 + 1] = SH_C2_0 * x;
    jac[5 * 3 + 1] = SH_C2_1 * z; jac[5 * 3 + 2] = SH_C2_1 * y;
    jac[6 * 3 + 0] = SH_C2_2 * (-2.f * x); jac[6 * 3 + 1] = SH_C2_2 * (-2.f * y); jac[6 * 3 + 2] = SH_C2_2 * (4.f * z);
    jac[7 * 3 + 0] = SH_C2_3 * z; jac[7 * 3 + 2] = SH_C2_3 * x;
    jac[8 * 3 + 0] = SH_C2_4 * (2.f * x); jac[8 * 3 + 1] = SH_C2_4 * (-2.f * y);
    if (degree < 3) return;
    jac[9 * 3 + 0] = SH_C3_0 * 6.f * x * y;
    jac[9 * 3 + 1] = SH_C3_0 * (3.f * xx - 3.f * yy);
    jac[10 * 3 + 0] = SH_C3_1 * y * z; jac[10 * 3 + 1] = SH_C3_1 * x * z; jac[10 * 3 + 2] = SH_C3_1 * x * y;
    jac[11 * 3 + 0] = SH_C3_2 * (-2.f * x * y);
    jac[11 * 3 + 1] = SH_C3_2 * (4.f * zz - xx - 3.f * yy);
    jac[11 * 3 + 2] = SH_C3_2 * (8.f * y * z);
    jac[12 * 3 + 0] = SH_C3_3 * (-6.f * x * z);
    jac[12 * 3 + 1] = SH_C3_3 * (-6.f * y * z);
    jac[12 * 3 + 2] = SH_C3_3 * (6.f * zz - 3.f * xx - 3.f * yy);
    jac[13 * 3 + 0] = SH_C3_4 * (4.f * zz - 3.f * xx - yy);
    jac[13 * 3 + 1] = SH_C3_4 * (-2.f * x * y);
    jac[13 * 3 + 2] = SH_C3_4 * (8.f * x * z);
    jac[14 * 3 + 0] = SH_C3_5 * (2.f * x * z);
    jac[14 * 3 + 1] = SH_C3_5 * (-2.f * y * z);
    jac[14 * 3 + 2] = SH_C3_5 * (xx - yy);
    jac[15 * 3 + 0] = SH_C3_6 * (3.f * xx - 3.f * yy);
    jac[15 * 3 + 1] = SH_C3_6 * (-6.f * x * y);
}

LF_HD void sh_eval(int degree, int K, const float *dir, const float *coeffs, float *out) {
    float n = sqrtf(dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2]);
    float inv = 1.f / lf_max(n, 1e-12f);
    float b[16];
    sh_basis(degree, dir[0] * inv, dir[1] * inv, dir[2] * inv, b);
    int nb = (degree + 1) * (degree + 1);
    float r = 0.f, g = 0.f, bl = 0.f;
    for (int k = 0; k < nb; ++k) {
        r += b[k] * coeffs[k * 3 + 0];
        g += b[k] * coeffs[k * 3 + 1];
        bl += b[k] * coeffs[k * 3 + 2];
    }
    out[0] = r; out[1] = g; out[2] = bl;
    (void)K;
}

LF_HD void sh_eval_vjp(int degree, int K, const float *dir, const float *coeffs, const float *v_out,
                       float *v_coeffs, float *v_dir /*nullable*/) {
    float n = sqrtf(dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2]);
    float inv = 1.f / lf_max(n, 1e-12f);
    float x = dir[0] * inv, y = dir[1] * inv, z = dir[2] * inv;
    float b[16];
    sh_basis(degree, x, y, z, b);
    int nb = (degree + 1) * (degree + 1);
    for (int k = 0; k < nb; ++k) {
        v_coeffs[k * 3 + 0] += b[k] * v_out[0];
        v_coeffs[k * 3 + 1] += b[k] * v_out[1];
        v_coeffs[k * 3 + 2] += b[k] * v_out[2];
    }
    (void)K;
    if (!v_dir || degree < 1 || !(n > 1e-12f)) return;
    float jac[48];
    sh_basis_jac(degree, x, y, z, jac);
    float vu[3] = {0.f, 0.f, 0.f};  // d loss / d unit direction
    for (int k = 1; k < nb; ++k) {
        float vb = coeffs[k * 3 + 0] * v_out[0] + coeffs[k * 3 + 1] * v_out[1] + coeffs[k * 3 + 2] * v_out[2];
        vu[0] += vb * jac[k * 3 + 0];
        vu[1] += vb * jac[k * 3 + 1];
        vu[2] += vb * jac[k * 3 + 2];
    }
    // u = d / |d|: v_d = (vu - u (u . vu)) / |d|
    float dot = x * vu[0] + y * vu[1] + z * vu[2];
    v_dir[0] += (vu[0] - x * dot) * inv;
    v_dir[1] += (vu[1] - y * dot) * inv;
    v_dir[2] += (vu[2] - z * dot) * inv;
}

// ---------------------------------------------------------------- box filter
// The mean over size x size windows (lf_box_filter): output x takes the input
// indices [x - b, x + a] with a = (size - 1) / 2, b = size / 2 (odd sizes centred;
// an even size has one more before than after), past the borders reflected
// without repeating the edge (BORDER_REFLECT_101: -1 -> 1, n -> n - 2) when both
// axes are longer than the half-window, else replicated (clamped) on both.
LF_HD int box_border(int i, int n, bool reflect) {
    if (reflect) {
        if (i < 0) return -i;
        if (i >= n) return 2 * n - 2 - i;
        return i;
    }
    return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// Whether an axis of length n is longer than this size's half-window.
LF_HD bool box_reflects(int n, int size) {
    const int a = (size - 1) / 2, b = size / 2;
    return n > (a > b ? a : b);
}

// Running window sums along one axis of length n (stride between elements),
// in double, at positions [x0, x0 + nx): out[x - x0] = sum of src over the
// window of x, starting from x0's window (so a row cut into strips gives the
// same sums whichever driver runs the strips).
template <typename In>
LF_HD void box_running_sums(const In *src, int64_t stride, int n, int size, bool reflect, int x0, int nx,
                            double *out, int64_t out_stride) {
    const int a = (size - 1) / 2, b = size / 2;
    double s = 0.0;
    for (int k = x0 - b; k <= x0 + a; ++k) s += (double)src[(int64_t)box_border(k, n, reflect) * stride];
    out[0] = s;
    for (int x = x0 + 1; x < x0 + nx; ++x) {
        s += (double)src[(int64_t)box_border(x + a, n, reflect) * stride] -
             (double)src[(int64_t)box_border(x - 1 - b, n, reflect) * stride];
        out[(int64_t)(x - x0) * out_stride] = s;
    }
}

// The column strips of the box filter's row pass (both drivers).
constexpr int BOX_STRIP = 64;

}  // namespace lf
