"""The maths written once: spherical harmonics, quaternions (wxyz), rotations and SE(3).

Everything here is plain torch (or numpy where noted), differentiable where it says so, with
the conventions of gsplat 1.5.3 and 3DGS (SH signs and order of gsplat's
``spherical_harmonics``; quaternions wxyz; OpenCV cameras). The scene model, the torch
reference renderer, queries, the viewer, the scene writers and online tracking import it from
here instead of keeping their own copies.
"""

from __future__ import annotations

import math


import numpy as np
import torch
from torch import Tensor

__all__ = ["SH_C0", "SH_C1", "SH_C2", "SH_C3", "rgb_to_sh", "sh_to_rgb", "num_sh_bases", "sh_degree_from_bases",
           "eval_sh_bases", "sh_rotation_matrices", "quat_multiply", "quat_to_rotmat", "rotmat_to_quat",
           "rotmat_to_quat_np", "quat_to_rotmat_np", "skew", "so3_exp", "se3_exp", "se3_log", "inv_rigid",
           "inv_rigid_np", "quat_xyzw_to_rot", "rot_to_quat_xyzw", "slerp"]

SH_C0 = 0.28209479177387814


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] -> degree-0 SH coefficient (3DGS' ``RGB2SH``)."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh: Tensor) -> Tensor:
    return sh * SH_C0 + 0.5


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def sh_degree_from_bases(k: int) -> int:
    """Number of SH bases K (including the DC term) -> degree; ValueError if K is not a square."""
    d = int(round(math.sqrt(k))) - 1
    if d < 0 or (d + 1) ** 2 != k:
        raise ValueError(f"{k} SH coefficients per channel is not (degree + 1)^2 for any degree")
    return d


# --------------------------------------------------------------------------------------
# Spherical harmonics (real basis with the signs used by 3DGS and gsplat)

SH_C1 = _C1 = 0.4886025119029199
SH_C2 = _C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = _C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
       1.445305721320277, -0.5900435899266435)


def eval_sh_bases(degree: int, dirs: Tensor) -> Tensor:
    """SH basis values [..., (degree+1)^2] at unit directions ``dirs`` [..., 3] (degree <= 3),
    in the order and sign convention of gsplat's ``spherical_harmonics``."""
    if degree > 3:
        raise ValueError("SH degree > 3 is not supported")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [_C2[0] * xy, _C2[1] * yz, _C2[2] * (2 * zz - xx - yy), _C2[3] * xz, _C2[4] * (xx - yy)]
    if degree >= 3:
        out += [_C3[0] * y * (3 * xx - yy), _C3[1] * xy * z, _C3[2] * y * (4 * zz - xx - yy),
                _C3[3] * z * (2 * zz - 3 * xx - 3 * yy), _C3[4] * x * (4 * zz - xx - yy),
                _C3[5] * z * (xx - yy), _C3[6] * x * (xx - 3 * yy)]
    return torch.stack(out, -1)


def sh_rotation_matrices(R: Tensor, degree: int) -> list:
    """Per-band matrices ``D_l`` [(2l+1), (2l+1)], l = 1..degree, such that rotating the
    world by ``R`` maps SH coefficients ``c`` of band l to ``D_l @ c`` (colour seen along the
    rotated direction ``R d`` equals the old colour along ``d``). Computed by least squares on
    sample directions, in float64."""
    R = torch.as_tensor(R, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    Y = eval_sh_bases(degree, d)
    Yr = eval_sh_bases(degree, d @ R.T)
    mats = []
    for l in range(1, degree + 1):
        s = slice(l * l, (l + 1) * (l + 1))
        # Yr = Y @ M^T  (Y(R d) = M Y(d)); coefficients transform with M (orthogonal).
        Mt = torch.linalg.lstsq(Y[:, s], Yr[:, s]).solution
        mats.append(Mt.T.contiguous())
    return mats


# --------------------------------------------------------------------------------------
# Quaternions (wxyz)

def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], -1)


def rotmat_to_quat(R: Tensor) -> Tensor:
    """3x3 rotation -> unit quaternion wxyz with w >= 0."""
    R = torch.as_tensor(R, dtype=torch.float64)
    m = R
    t = m[0, 0] + m[1, 1] + m[2, 2]
    if t > 0:
        s = torch.sqrt(t + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = torch.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = torch.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = torch.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in q])
    q = q / q.norm()
    return -q if q[0] < 0 else q




def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[..., 4] wxyz (any norm) -> [..., 3, 3]; differentiable (the torch reference renderer's)."""
    n = torch.linalg.vector_norm(quats, dim=-1, keepdim=True)
    q = quats / torch.clamp(n, min=1e-12)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return R.reshape(quats.shape[:-1] + (3, 3))


def quat_to_rotmat_np(q) -> np.ndarray:
    """numpy: one wxyz quaternion (any norm) -> 3x3 float64."""
    q = np.asarray(q, dtype=np.float64)
    return quat_to_rotmat(torch.from_numpy(q / max(float(np.linalg.norm(q)), 1e-12))).numpy()


def rotmat_to_quat_np(R) -> np.ndarray:
    """numpy: 3x3 rotation -> unit quaternion wxyz (float64) with w >= 0."""
    return rotmat_to_quat(torch.as_tensor(np.asarray(R, dtype=np.float64))).numpy()


# --------------------------------------------------------------------------------------
# SE(3)

def skew(v: Tensor) -> Tensor:
    """[..., 3] -> [..., 3, 3] cross-product matrices."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(v.shape[:-1] + (3, 3))


def so3_exp(w: Tensor) -> Tensor:
    """Rodrigues: axis-angle [..., 3] -> rotation [..., 3, 3]; differentiable, exact near 0."""
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]
    theta = torch.sqrt(theta2.clamp_min(1e-24))
    small = theta2 < 1e-8
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-24))
    K = skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(K.shape)
    return eye + a * K + b * (K @ K)


def se3_exp(xi: Tensor) -> Tensor:
    """Twist [..., 6] = (rho (translation part), omega (rotation part)) -> [..., 4, 4] rigid
    transform (the exponential map of SE(3)); differentiable. Pose updates made as
    ``se3_exp(delta) @ T`` keep rotations exact rotations."""
    rho, w = xi[..., :3], xi[..., 3:]
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]
    theta = torch.sqrt(theta2.clamp_min(1e-24))
    small = theta2 < 1e-8
    K = skew(w)
    R = so3_exp(w)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-24))
    c = torch.where(small, 1.0 / 6.0 - theta2 / 120.0, (theta - torch.sin(theta)) / (theta2 * theta).clamp_min(1e-24))
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand(K.shape)
    V = eye + b * K + c * (K @ K)
    t = (V @ rho[..., None])[..., 0]
    T = torch.zeros(xi.shape[:-1] + (4, 4), dtype=xi.dtype, device=xi.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T


def se3_log(T: Tensor) -> Tensor:
    """[..., 4, 4] rigid transform -> twist [..., 6] (inverse of :func:`se3_exp`, angles < pi)."""
    R, t = T[..., :3, :3], T[..., :3, 3]
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    theta = torch.acos(cos)[..., None]
    vee = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    small = theta < 1e-4
    f = torch.where(small, 0.5 + theta * theta / 12.0, theta / (2.0 * torch.sin(theta).clamp_min(1e-12)))
    w = f * vee
    theta2 = (theta * theta)[..., None]
    K = skew(w)
    eye = torch.eye(3, dtype=T.dtype, device=T.device).expand(K.shape)
    coef = torch.where(small[..., None], torch.full_like(theta2, 1.0 / 12.0),
                       (1.0 - theta[..., None] * torch.sin(theta[..., None])
                        / (2.0 * (1.0 - torch.cos(theta[..., None])).clamp_min(1e-12))) / theta2.clamp_min(1e-24))
    Vinv = eye - 0.5 * K + coef * (K @ K)
    rho = (Vinv @ t[..., None])[..., 0]
    return torch.cat([rho, w], -1)


def inv_rigid(T: Tensor) -> Tensor:
    """Inverse of rigid transforms [..., 4, 4] (R^T, -R^T t), exact for rotations."""
    R, t = T[..., :3, :3], T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1.0
    return out


def inv_rigid_np(T) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = T[:3, :3].T
    out[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return out


# --------------------------------------------------------------------------------------
# numpy quaternions in the TUM / ROS order (qx, qy, qz, qw), vectorised; slerp

def quat_xyzw_to_rot(q) -> np.ndarray:
    """Quaternion(s) ``(qx, qy, qz, qw)`` [..., 4] (normalised here) -> rotation(s) [..., 3, 3]."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    R = np.empty(q.shape[:-1] + (3, 3))
    R[..., 0, 0] = 1 - 2 * (y * y + z * z)
    R[..., 0, 1] = 2 * (x * y - z * w)
    R[..., 0, 2] = 2 * (x * z + y * w)
    R[..., 1, 0] = 2 * (x * y + z * w)
    R[..., 1, 1] = 1 - 2 * (x * x + z * z)
    R[..., 1, 2] = 2 * (y * z - x * w)
    R[..., 2, 0] = 2 * (x * z - y * w)
    R[..., 2, 1] = 2 * (y * z + x * w)
    R[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return R


def rot_to_quat_xyzw(R) -> np.ndarray:
    """Rotation(s) [..., 3, 3] -> unit quaternion(s) ``(qx, qy, qz, qw)`` with ``qw >= 0``."""
    R = np.asarray(R, dtype=np.float64)
    flat = R.reshape(-1, 3, 3)
    out = np.empty((len(flat), 4))
    for i, m in enumerate(flat):
        tr = m[0, 0] + m[1, 1] + m[2, 2]
        if tr > 0:
            s = math.sqrt(tr + 1.0) * 2
            q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
        elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
            s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
            q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
        elif m[1, 1] > m[2, 2]:
            s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
            q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
        else:
            s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
            q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
        q = np.asarray(q)
        q /= np.linalg.norm(q)
        out[i] = -q if q[3] < 0 else q
    return out.reshape(R.shape[:-2] + (4,))


def slerp(q0, q1, a) -> np.ndarray:
    """Spherical linear interpolation of unit quaternions (xyzw) [..., 4] at fraction(s) ``a``
    (the shorter arc)."""
    q0 = np.asarray(q0, dtype=np.float64)
    q1 = np.asarray(q1, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)[..., None]
    q0 = q0 / np.linalg.norm(q0, axis=-1, keepdims=True)
    q1 = q1 / np.linalg.norm(q1, axis=-1, keepdims=True)
    d = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(d < 0, -q1, q1)
    d = np.abs(d)
    theta = np.arccos(np.clip(d, -1.0, 1.0))
    s = np.sin(theta)
    small = s < 1e-9
    safe = np.where(small, 1.0, s)
    w0 = np.where(small, 1 - a, np.sin((1 - a) * theta) / safe)
    w1 = np.where(small, a, np.sin(a * theta) / safe)
    q = w0 * q0 + w1 * q1
    return q / np.linalg.norm(q, axis=-1, keepdims=True)
