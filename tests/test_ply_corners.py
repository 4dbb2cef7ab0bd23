"""Corner cases of the 3DGS PLY reader/writer (langfield.io.ply): encodings and layouts other
tools write, empty and non-finite files, nerfstudio's rgb export, compressed PLY decoding,
and clear errors for broken files."""

import math

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from langfield.io import PlyError, read_ply, read_points_ply, write_ply
from langfield.scene import SH_C0, Gaussians


def _params(n, degree, seed=0):
    rng = np.random.default_rng(seed)
    k1 = (degree + 1) ** 2 - 1
    return {"means": rng.normal(size=(n, 3)).astype(np.float32), "quats": rng.normal(size=(n, 4)).astype(np.float32),
            "scales": (rng.normal(size=(n, 3)) - 3).astype(np.float32),
            "opacities": rng.normal(size=n).astype(np.float32), "sh0": rng.normal(size=(n, 1, 3)).astype(np.float32),
            "shN": rng.normal(size=(n, k1, 3)).astype(np.float32)}


def _vertex(p, names=None, dtype="<f4", normals=True, extra=()):
    """A structured vertex array of the standard 3DGS properties (f_rest channel-major)."""
    n, k1 = len(p["means"]), p["shN"].shape[1]
    vals = {}
    for i, c in enumerate("xyz"):
        vals[c] = p["means"][:, i]
        vals["n" + c] = np.zeros(n, np.float32)
    for i in range(3):
        vals[f"f_dc_{i}"] = p["sh0"][:, 0, i]
        vals[f"scale_{i}"] = p["scales"][:, i]
    rest = p["shN"].transpose(0, 2, 1).reshape(n, 3 * k1)
    for i in range(3 * k1):
        vals[f"f_rest_{i}"] = rest[:, i]
    vals["opacity"] = p["opacities"]
    for i in range(4):
        vals[f"rot_{i}"] = p["quats"][:, i]
    if names is None:
        names = ["x", "y", "z"] + (["nx", "ny", "nz"] if normals else []) + [f"f_dc_{i}" for i in range(3)]
        names += [f"f_rest_{i}" for i in range(3 * k1)] + ["opacity"] + [f"scale_{i}" for i in range(3)]
        names += [f"rot_{i}" for i in range(4)]
    a = np.zeros(n, dtype=[(k, dtype) for k in names] + list(extra))
    for k in names:
        a[k] = vals[k]
    return a


def _assert_same(g, p):
    for k, v in p.items():
        got = g.splats[k].detach().numpy()
        assert got.shape == v.shape and np.array_equal(got, v), k


ENCODINGS = {
    "ascii": dict(text=True),
    "big_endian": dict(byte_order=">", dtype=">f4"),
    "float64": dict(dtype="<f8"),
    "float64_big_endian": dict(byte_order=">", dtype=">f8"),
}


@pytest.mark.parametrize("enc", sorted(ENCODINGS))
@pytest.mark.parametrize("degree", [0, 3])
def test_encodings_roundtrip(tmp_path, enc, degree):
    opts = dict(ENCODINGS[enc])
    dtype = opts.pop("dtype", "<f4")
    p = _params(11, degree)
    src = tmp_path / "src.ply"
    PlyData([PlyElement.describe(_vertex(p, dtype=dtype), "vertex")], comments=["made by a test"],
            obj_info=["info line"], **opts).write(str(src))
    g, layout = read_ply(src, return_layout=True)
    assert g.sh_degree == degree
    _assert_same(g, p)  # float32 values survive ASCII and float64 exactly
    assert layout.comments == ["made by a test"] and layout.obj_info == ["info line"]
    write_ply(tmp_path / "re.ply", g, layout=layout)
    assert (tmp_path / "re.ply").read_bytes() == src.read_bytes()


def test_extra_typed_properties_and_order_preserved(tmp_path):
    """Other tools' properties (uchar colours, int ids, ushort flags) in a shuffled order next
    to a face element: read by name, written back byte for byte."""
    p = _params(9, 2)
    base = list(_vertex(p, normals=False).dtype.names)
    order = list(np.random.default_rng(3).permutation(base))
    a = _vertex(p, names=order, extra=[("red", "u1"), ("green", "u1"), ("blue", "u1"), ("id", "<i4"), ("f", "<u2")])
    a["red"], a["id"], a["f"] = np.arange(9) * 20, -np.arange(9), 65535
    faces = np.array([([0, 1, 2],)], dtype=[("vertex_indices", "O")])
    src = tmp_path / "x.ply"
    PlyData([PlyElement.describe(a, "vertex"), PlyElement.describe(faces, "face")]).write(str(src))
    g, layout = read_ply(src, return_layout=True)
    _assert_same(g, p)  # f_dc present: red/green/blue are extra properties, not the colour
    assert layout.names == order + ["red", "green", "blue", "id", "f"]
    assert list(layout.extra["id"]) == list(-np.arange(9))
    write_ply(tmp_path / "re.ply", g, layout=layout)
    re = PlyData.read(str(tmp_path / "re.ply"))
    assert [e.name for e in re.elements] == ["vertex"]  # faces are not Gaussians
    assert np.array_equal(re["vertex"].data, a)


def test_crlf_header_and_trailing_bytes(tmp_path):
    p = _params(5, 1)
    src = tmp_path / "s.ply"
    PlyData([PlyElement.describe(_vertex(p), "vertex")], comments=["c"]).write(str(src))
    raw = src.read_bytes()
    cut = raw.index(b"end_header\n") + len(b"end_header\n")
    crlf = tmp_path / "crlf.ply"
    crlf.write_bytes(raw[:cut].replace(b"\n", b"\r\n") + raw[cut:] + b"\x00" * 13)
    _assert_same(read_ply(crlf), p)


def test_zero_gaussians(tmp_path):
    p = _params(0, 3)
    src = tmp_path / "empty.ply"
    PlyData([PlyElement.describe(_vertex(p), "vertex")]).write(str(src))
    g, layout = read_ply(src, return_layout=True)
    assert g.num == 0 and g.sh_degree == 3
    write_ply(tmp_path / "re.ply", g, layout=layout)
    assert (tmp_path / "re.ply").read_bytes() == src.read_bytes()
    write_ply(tmp_path / "std.ply", g)  # used to fail reshaping an empty [0, 15, 3] array
    assert read_ply(tmp_path / "std.ply").num == 0
    g0 = Gaussians.from_dict({k: torch.from_numpy(v) for k, v in _params(0, 1).items()})
    write_ply(tmp_path / "g.ply", g0, layout="gsplat")
    assert read_ply(tmp_path / "g.ply").sh_degree == 1


def test_nerfstudio_rgb_export(tmp_path):
    """nerfstudio's ``ply_color_mode=rgb``: uchar red green blue instead of f_dc_*."""
    p = _params(8, 0)
    names = ["x", "y", "z", "nx", "ny", "nz", "red", "green", "blue", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]
    a = np.zeros(8, dtype=[(k, "u1" if k in ("red", "green", "blue") else "<f4") for k in names])
    for i, c in enumerate("xyz"):
        a[c] = p["means"][:, i]
    rgb = np.stack([np.arange(8) * 36, np.full(8, 255), np.zeros(8)], 1).astype(np.uint8)
    a["red"], a["green"], a["blue"] = rgb.T
    a["opacity"] = p["opacities"]
    for i in range(3):
        a[f"scale_{i}"] = p["scales"][:, i]
    for i in range(4):
        a[f"rot_{i}"] = p["quats"][:, i]
    src = tmp_path / "ns.ply"
    PlyData([PlyElement.describe(a, "vertex")]).write(str(src))
    g, layout = read_ply(src, return_layout=True)
    assert g.sh_degree == 0 and np.array_equal(g.means.detach().numpy(), p["means"])
    want_sh0 = (rgb.astype(np.float32) / 255 - 0.5) / SH_C0
    assert np.allclose(g.sh0.detach().numpy()[:, 0], want_sh0, atol=1e-6)
    assert np.abs(g.rgb.detach().numpy() * 255 - rgb).max() < 1e-3
    assert layout.extra is None
    write_ply(tmp_path / "re.ply", g, layout=layout)  # colours written back from sh0
    assert (tmp_path / "re.ply").read_bytes() == src.read_bytes()
    write_ply(tmp_path / "std.ply", g)
    assert torch.equal(read_ply(tmp_path / "std.ply").sh0, g.sh0)


def test_non_finite_values_kept_with_warning(tmp_path):
    p = _params(6, 1)
    p["means"][2, 1] = np.nan
    p["scales"][4, 0] = np.inf
    p["opacities"][0] = np.inf  # PlayCanvas' decompressor writes +-inf logits for alpha 1 / 0: no warning
    src = tmp_path / "nan.ply"
    PlyData([PlyElement.describe(_vertex(p), "vertex")]).write(str(src))
    with pytest.warns(UserWarning, match=r"nan.ply: 2 of 6 Gaussians have NaN or infinite values.*vertex 2"):
        g = read_ply(src)
    got = g.means.detach().numpy()
    assert np.isnan(got[2, 1]) and np.array_equal(np.delete(got, 2, 0), np.delete(p["means"], 2, 0))
    assert g.scales[4, 0].item() == math.inf and g.opacities[0].item() == math.inf


def test_errors_name_file_and_property(tmp_path):
    p = _params(4, 1)
    # Gaussian properties without rotations: not called a plain point cloud
    a = _vertex(p, names=["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2"])
    f = tmp_path / "norot.ply"
    PlyData([PlyElement.describe(a, "vertex")]).write(str(f))
    with pytest.raises(PlyError, match="norot.ply: not a 3D Gaussian splatting PLY.*lack rot_0, rot_1, rot_2, rot_3"):
        read_ply(f)
    # header claiming more vertices than the body holds, body cut short, empty file
    good = tmp_path / "good.ply"
    PlyData([PlyElement.describe(_vertex(p), "vertex")]).write(str(good))
    raw = good.read_bytes()
    for name, data in (("more.ply", raw.replace(b"element vertex 4", b"element vertex 5")),
                       ("cut.ply", raw[:-1]), ("zero.ply", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PlyError, match=name):
            read_ply(tmp_path / name)
    # a list property among the vertex properties: Gaussians read, the layout drops it
    a = _vertex(p, extra=[("idx", "O")])
    for i in range(4):
        a["idx"][i] = np.arange(i, dtype=np.int32)
    f = tmp_path / "list.ply"
    PlyData([PlyElement.describe(a, "vertex", val_types={"idx": "i4"})]).write(str(f))
    with pytest.warns(UserWarning, match="list properties"):
        g, layout = read_ply(f, return_layout=True)
    _assert_same(g, p)
    write_ply(tmp_path / "re.ply", g, layout=layout)
    _assert_same(read_ply(tmp_path / "re.ply"), p)


# ------------------------------------------------------------------------------------------
# compressed PLY (PlayCanvas / SuperSplat)

def _compressed(path, vertex, chunk, sh=None):
    v = np.zeros(len(vertex["packed_position"]), dtype=[(k, "<u4") for k in vertex])
    for k in vertex:
        v[k] = vertex[k]
    c = np.zeros(1, dtype=[(k, "<f4") for k in chunk])
    for k in chunk:
        c[k] = chunk[k]
    els = [PlyElement.describe(c, "chunk"), PlyElement.describe(v, "vertex")]
    if sh is not None:
        s = np.zeros(sh.shape[0], dtype=[(f"f_rest_{i}", "u1") for i in range(sh.shape[1])])
        for i in range(sh.shape[1]):
            s[f"f_rest_{i}"] = sh[:, i]
        els.append(PlyElement.describe(s, "sh"))
    PlyData(els).write(str(path))


CHUNK = {"min_x": -1, "min_y": 0, "min_z": 2, "max_x": 3, "max_y": 1, "max_z": 4,
         "min_scale_x": -5, "min_scale_y": -4, "min_scale_z": -3, "max_scale_x": -1, "max_scale_y": -2,
         "max_scale_z": 0}


def test_compressed_decoding_matches_format(tmp_path):
    """Decoding per PlayCanvas' reader: 11-10-11 positions/scales lerped in the chunk's range,
    2-bit largest quaternion index + 3x10 bits, 8888 colour + alpha, SH bytes with 0 and 255
    at -4 and +4."""
    pos = np.array([(2047 << 21) | (0 << 11) | 1023, (0 << 21) | (1023 << 11) | 2047], np.uint32)
    rot = np.array([(0 << 30) | (512 << 20) | (0 << 10) | 1023, (3 << 30) | (1023 << 20) | (511 << 10) | 0],
                   np.uint32)
    col = np.array([(255 << 24) | (0 << 16) | (128 << 8) | 255, (51 << 24) | (102 << 16) | (204 << 8) | 64],
                   np.uint32)
    sh = np.array([[0, 255, 128] * 3, [1, 254, 127] * 3], np.uint8)
    chunk = dict(CHUNK, min_r=0.1, min_g=0.2, min_b=0.3, max_r=0.9, max_g=0.8, max_b=0.7)
    f = tmp_path / "c.ply"
    _compressed(f, {"packed_position": pos, "packed_rotation": rot, "packed_scale": pos, "packed_color": col}, chunk,
                sh)
    g = read_ply(f)
    assert g.num == 2 and g.sh_degree == 1
    u = np.array([[1, 0, 1023 / 2047], [0, 1, 1]])
    lo, hi = np.array([-1, 0, 2.0]), np.array([3, 1, 4.0])
    assert np.allclose(g.means.detach().numpy(), lo + u * (hi - lo), atol=1e-6)
    slo, shi = np.array([-5, -4, -3.0]), np.array([-1, -2, 0.0])
    assert np.allclose(g.scales.detach().numpy(), slo + u * (shi - slo), atol=1e-6)

    def comp(b):
        return (b / 1023 - 0.5) / (math.sqrt(2) * 0.5)

    a, b, c = comp(512), comp(0), comp(1023)
    q0 = [math.sqrt(max(0, 1 - a * a - b * b - c * c)), a, b, c]
    a, b, c = comp(1023), comp(511), comp(0)
    q1 = [a, b, c, math.sqrt(max(0, 1 - a * a - b * b - c * c))]
    assert np.allclose(g.quats.detach().numpy(), [q0, q1], atol=1e-6)
    clo, chi = np.array([0.1, 0.2, 0.3]), np.array([0.9, 0.8, 0.7])
    rgb = clo + np.array([[1, 0, 128 / 255], [51 / 255, 102 / 255, 204 / 255]]) * (chi - clo)
    assert np.allclose(g.sh0.detach().numpy()[:, 0], (rgb - 0.5) / SH_C0, atol=1e-5)
    op = g.opacities.detach().numpy()
    assert op[0] > 13 and math.isfinite(op[0])  # alpha 1: a large finite logit
    assert op[1] == pytest.approx(math.log(64 / 191), abs=1e-5)
    shN = g.shN.detach().numpy()  # channel-major bytes -> [N, 3 coefficients, 3 channels]
    dec = lambda v: (v + 0.5) / 256 * 8 - 4  # noqa: E731
    assert np.allclose(shN[0, :, 0], [-4, 4, dec(128)]) and np.allclose(shN[1, :, 0], [dec(1), dec(254), dec(127)])
    # the points of a compressed file
    xyz, cols = read_points_ply(f)
    assert np.allclose(xyz, g.means.detach().numpy()) and np.allclose(cols, rgb, atol=1e-6)


def test_compressed_variants_and_errors(tmp_path):
    pos = np.array([0, 0xFFFFFFFF], np.uint32)
    vert = {"packed_position": pos, "packed_rotation": pos & 0x3FFFFFFF, "packed_scale": pos,
            "packed_color": np.array([0x80FF00FF, 0x00000000], np.uint32)}
    # older SuperSplat files: no chunk colour range, colours are the 8-bit values themselves
    f = tmp_path / "old.ply"
    _compressed(f, vert, CHUNK)
    g = read_ply(f)
    assert g.sh_degree == 0 and np.allclose(g.rgb.detach().numpy(), [[128 / 255, 1, 0], [0, 0, 0]], atol=1e-6)
    # broken files: named, with what is wrong
    cases = {"nosh.ply": (dict(vert), CHUNK, np.zeros((2, 10), np.uint8), "10 f_rest_"),
             "rows.ply": (dict(vert), CHUNK, np.zeros((1, 9), np.uint8), "1 'sh' rows for 2 splats"),
             "noscale.ply": ({k: v for k, v in vert.items() if k != "packed_scale"}, CHUNK, None, "packed_scale"),
             "nochunk.ply": (dict(vert), {k: v for k, v in CHUNK.items() if k != "max_z"}, None, "max_z")}
    for name, (v, c, sh, msg) in cases.items():
        _compressed(tmp_path / name, v, c, sh)
        with pytest.raises(PlyError, match=f"{name}.*{msg}"):
            read_ply(tmp_path / name)


# ------------------------------------------------------------------------------------------
# point clouds for initialisation

def test_points_ply_corners(tmp_path):
    a = np.zeros(4, dtype=[("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("red", "<f4"), ("green", "<f4"),
                           ("blue", "<f4")])
    a["x"] = [0, np.nan, 2, 3]
    a["red"] = [0, 51, 255, 102]  # float colours stored 0..255
    f = tmp_path / "pts.ply"
    PlyData([PlyElement.describe(a, "vertex")], text=True).write(str(f))
    with pytest.warns(UserWarning, match="skipping 1 of 4 points"):
        xyz, rgb = read_points_ply(f)
    assert np.array_equal(xyz[:, 0], [0, 2, 3]) and np.allclose(rgb[:, 0], [0, 1, 0.4])
    b = np.zeros(2, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    b["x"] = np.nan
    PlyData([PlyElement.describe(b, "vertex")]).write(str(tmp_path / "nan.ply"))
    with pytest.warns(UserWarning), pytest.raises(PlyError, match="nan.ply: empty point cloud"):
        read_points_ply(tmp_path / "nan.ply")
