"""langfield.eval.trajectory: TUM files, association, Umeyama, ATE, RPE."""

import math

import numpy as np
import pytest

from langfield.eval.trajectory import (Trajectory, TrajectoryError, associate, ate, format_report, quat_to_rot,
                                       read_tum_trajectory, rot_to_quat, rpe, slerp, trajectory_report, umeyama,
                                       write_tum_trajectory)


def rot(axis, deg):
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    th = math.radians(deg)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * K @ K


def random_poses(n, seed=0):
    rng = np.random.default_rng(seed)
    P = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        P[i, :3, :3] = rot(rng.normal(size=3), rng.uniform(0, 180))
        P[i, :3, 3] = rng.normal(size=3)
    return P


def test_quaternions_round_trip_and_slerp():
    P = random_poses(50, 1)
    q = rot_to_quat(P[:, :3, :3])
    assert np.all(q[:, 3] >= 0)
    np.testing.assert_allclose(quat_to_rot(q), P[:, :3, :3], atol=1e-12)
    q0 = rot_to_quat(np.eye(3))
    q1 = rot_to_quat(rot([0, 0, 1], 90))
    np.testing.assert_allclose(quat_to_rot(slerp(q0, q1, 1 / 3)), rot([0, 0, 1], 30), atol=1e-12)


def test_ate_of_rigidly_moved_copy_is_zero():
    ref = random_poses(40, 2)
    T = np.eye(4)
    T[:3, :3] = rot([1, 2, 3], 73)
    T[:3, 3] = [4.0, -2.0, 7.5]
    est = T @ ref
    r = ate(est, ref)
    assert r["rmse"] < 1e-9 and r["max"] < 1e-9 and r["n"] == 40
    # unaligned, the same copy is far off; sim3 recovers a scaled copy exactly
    assert ate(est, ref, align="none")["rmse"] > 1.0
    est_s = est.copy()
    est_s[:, :3, 3] *= 2.5
    assert ate(est_s, ref, align="se3")["rmse"] > 0.1
    rs = ate(est_s, ref, align="sim3")
    assert rs["rmse"] < 1e-9 and abs(rs["scale"] - 1 / 2.5) < 1e-12


def test_ate_known_perturbation():
    # square in the xy plane, estimate pushed +-h along z with zero mean and no correlation
    # with x, y: the best rigid alignment is the identity and every error is h
    h = 0.03
    xy = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], float)
    ref = np.tile(np.eye(4), (8, 1, 1))
    est = ref.copy()
    for k in range(8):
        x, y = xy[k % 4] * (1 + k // 4)
        z = (k // 4) * 0.5
        ref[k, :3, 3] = [x, y, z]
        est[k, :3, 3] = [x, y, z + (h if k % 2 == 0 else -h)]
    r = ate(est, ref)
    assert abs(r["rmse"] - h) < 1e-12 and abs(r["mean"] - h) < 1e-12 and r["std"] < 1e-12
    # a hand-computed unaligned case: errors 0, 3, 4 -> rmse sqrt(25/3), mean 7/3, median 3
    ref3 = np.tile(np.eye(4), (3, 1, 1))
    est3 = ref3.copy()
    est3[1, :3, 3] = [3, 0, 0]
    est3[2, :3, 3] = [0, 4, 0]
    r3 = ate(est3, ref3, align="none")
    assert abs(r3["rmse"] - math.sqrt(25 / 3)) < 1e-12 and abs(r3["mean"] - 7 / 3) < 1e-12
    assert r3["median"] == 3 and r3["min"] == 0 and r3["max"] == 4


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 3))
    R = rot([0.3, -1, 0.2], 131)
    y = 1.7 * x @ R.T + [1, 2, 3]
    R2, t2, s2 = umeyama(x, y, with_scale=True)
    np.testing.assert_allclose(R2, R, atol=1e-12)
    np.testing.assert_allclose(t2, [1, 2, 3], atol=1e-12)
    assert abs(s2 - 1.7) < 1e-12
    with pytest.raises(TrajectoryError, match="at least 3"):
        umeyama(x[:2], y[:2])


def brute_associate(a, b, max_diff):
    swap = len(b) < len(a)
    s, l = (b, a) if swap else (a, b)
    i1, i2 = [], []
    for i, x in enumerate(s):
        d = np.abs(l - x)
        j = int(np.argmin(d))
        if d[j] <= max_diff:
            i1.append(i)
            i2.append(j)
    return (i2, i1) if swap else (i1, i2)


def test_association_matches_brute_force():
    rng = np.random.default_rng(4)
    for trial in range(200):
        n, m = rng.integers(1, 50, 2)
        a = rng.uniform(0, 2, n)
        b = rng.uniform(0, 2, m)
        if trial % 3 == 0:  # ties and duplicates
            a, b = np.round(a, 1), np.round(b, 1)
        got = associate(a, b, 0.02)
        want = brute_associate(a, b, 0.02)
        assert got[0].tolist() == want[0] and got[1].tolist() == want[1], trial
    ie, ir = associate([0.0, 0.1, 0.2], [0.005, 0.1111, 0.3])
    assert ie.tolist() == [0] and ir.tolist() == [0]


def test_tum_file_round_trip(tmp_path):
    P = random_poses(25, 5)
    ts = 1305031102.175304 + np.arange(25) / 30.0
    p = write_tum_trajectory(tmp_path / "traj.txt", ts, P, header="test trajectory")
    text = p.read_text()
    assert text.startswith("# test trajectory\n# timestamp tx ty tz qx qy qz qw\n")
    t = read_tum_trajectory(p)
    assert np.array_equal(t.timestamps, ts)
    np.testing.assert_allclose(t.poses, P, atol=1e-12)
    # comments, blank lines, commas
    p2 = tmp_path / "b.txt"
    p2.write_text("# c\n\n1.0 0 0 0 0 0 0 1\n2.0,1,2,3,0,0,0,2\n")
    t2 = read_tum_trajectory(p2)
    assert t2.timestamps.tolist() == [1.0, 2.0] and np.allclose(t2.poses[1], np.c_[np.eye(4)[:, :3], [1, 2, 3, 1]])


@pytest.mark.parametrize("line,msg", [("1 2 3", "expected 8 values"), ("1 2 3 4 5 6 7 x", "not a number"),
                                      ("1 0 0 0 0 0 0 0", "zero length"), ("1 0 0 nan 0 0 0 1", "non-finite")])
def test_tum_file_errors_name_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.txt"
    p.write_text("# header\n0 0 0 0 0 0 0 1\n" + line + "\n")
    with pytest.raises(TrajectoryError, match=msg) as e:
        read_tum_trajectory(p)
    assert f"bad.txt:3:" in str(e.value)
    with pytest.raises(TrajectoryError, match="not found"):
        read_tum_trajectory(tmp_path / "missing.txt")


def test_rpe_hand_computed():
    n = 6
    ref = np.tile(np.eye(4), (n, 1, 1))
    est = np.tile(np.eye(4), (n, 1, 1))
    step_e = np.eye(4)
    step_e[:3, :3] = rot([0, 0, 1], 2.0)
    step_e[:3, 3] = [1.1, 0, 0]
    for k in range(1, n):
        ref[k, :3, 3] = [k, 0, 0]
        est[k] = est[k - 1] @ step_e
    r = rpe(est, ref, delta=1)
    # E = (Q_i^-1 Q_j)^-1 (P_i^-1 P_j) = (Rz(2 deg), (0.1, 0, 0)) for every pair
    assert r["trans"]["n"] == 5
    assert abs(r["trans"]["rmse"] - 0.1) < 1e-12 and abs(r["rot"]["rmse"] - 2.0) < 1e-9
    r2 = rpe(est, ref, delta=2)  # pairs (0, 2), (2, 4): E = (Rz(4), Rz(2) (1.1,0,0) + (1.1,0,0) - (2,0,0))
    t = rot([0, 0, 1], 2.0) @ [1.1, 0, 0] + [1.1, 0, 0] - [2, 0, 0]
    assert r2["trans"]["n"] == 2 and abs(r2["trans"]["rmse"] - np.linalg.norm(t)) < 1e-12
    assert abs(r2["rot"]["rmse"] - 4.0) < 1e-9
    assert rpe(est, ref, delta=2, all_pairs=True)["trans"]["n"] == 4


def test_trajectory_report_from_files(tmp_path):
    ref = random_poses(30, 6)
    ts = 100.0 + np.arange(30) / 30.0
    T = np.eye(4)
    T[:3, :3] = rot([0, 1, 0], 40)
    T[:3, 3] = [1, 1, 1]
    rng = np.random.default_rng(7)
    write_tum_trajectory(tmp_path / "ref.txt", ts, ref)
    write_tum_trajectory(tmp_path / "est.txt", ts[::2] + rng.uniform(-0.004, 0.004, 15), T @ ref[::2])
    rep = trajectory_report(tmp_path / "est.txt", tmp_path / "ref.txt")
    assert rep["n_matched"] == 15 and rep["ate"]["rmse"] < 1e-9 and rep["rpe"]["rot"]["rmse"] < 1e-6
    assert "ATE (se3) rmse 0.000 cm" in format_report(rep)
    with pytest.raises(TrajectoryError, match="no timestamp"):
        trajectory_report(tmp_path / "est.txt", tmp_path / "ref.txt", max_diff=1e-6)
    with pytest.raises(TrajectoryError, match="Trajectory objects"):
        ate(ref[:3], ref[:4])
    t = Trajectory(ts, ref)
    assert ate(Trajectory(ts[::2] + 0.003, T @ ref[::2]), t)["n"] == 15
