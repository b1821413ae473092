"""The docs' pictures (microattn/demo/pictures.py): they build, docs/pictures holds exactly
them, every one is shown on a docs page, and the facts they draw agree with the code and
the reference (tile counts, coverage of the allowed pairs, ownership, ring work)."""

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from microattn.demo import pictures
from microattn.kernels.spec import make_attention_spec

ROOT = Path(__file__).resolve().parents[2]
PICTURES_DIR = ROOT / "docs" / "pictures"


def spec_of(n, **kw):
    shape = (1, 1, n, 16)
    return make_attention_spec(shape, shape, shape, (np.float32,) * 3, **kw)


def test_build_all_writes_every_picture_and_the_committed_set_matches(tmp_path):
    pytest.importorskip("numba.cuda")  # the rung-2 picture reads tiled.py's kernel functions
    paths = pictures.build_all(tmp_path)
    assert [p.name for p in paths] == list(pictures.PICTURES)
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", path.name
        assert 5_000 < len(data) < 150_000, (path.name, len(data))
    assert {p.name for p in PICTURES_DIR.glob("*.png")} == set(pictures.PICTURES) | set(pictures.MEASURED)


def test_every_committed_picture_is_shown_on_a_docs_page():
    linked = set()
    for page in (ROOT / "docs").glob("*.md"):
        linked |= set(re.findall(r"!\[[^\]]*\]\(pictures/([\w.-]+\.png)\)", page.read_text()))
    assert {p.name for p in PICTURES_DIR.glob("*.png")} <= linked


def test_autograd_example_gradients_are_the_engines():
    nodes = {node.name: node for node in pictures.autograd_example()}
    assert [node.op for node in nodes.values()] == ["leaf", "leaf", "Mul", "Sum"]
    assert nodes["a"].grad.tolist() == [[12.0], [12.0]] and nodes["b"].grad.tolist() == [3.0, 3.0, 3.0]
    assert nodes["out"].grad == 1.0 and nodes["a * b"].grad.tolist() == [[1.0] * 3] * 2
    a, b = (list(nodes).index(name) for name in ("a", "b"))
    # Mul.backward's own return for a: grad * b, shape (2, 3), before unbroadcast
    assert nodes["a * b"].sent[a].tolist() == [[3.0, 4.0, 5.0]] * 2
    assert nodes["a * b"].sent[b].tolist() == [[1.0] * 3, [2.0] * 3]


@pytest.mark.parametrize("n_blocks", [1, 3, 5])
def test_causal_tile_count_is_n_n_plus_1_over_2(n_blocks):
    block = 8
    tiles = pictures.visited_tiles(spec_of(n_blocks * block, is_causal=True), blocks=(block, block))
    assert len(tiles) == n_blocks * (n_blocks + 1) // 2
    kinds = [t.kind for t in tiles]
    assert kinds.count(pictures.PARTIAL) == n_blocks  # the diagonal
    assert kinds.count(pictures.FULL) == n_blocks * (n_blocks - 1) // 2


CASES = {
    "full": {},
    "causal": {"is_causal": True},
    "window": {"window": (9, 2)},
    "varlen": {"cu_seqlens_q": np.array([0, 13, 30, 50]), "cu_seqlens_k": np.array([0, 13, 30, 50])},
    "mask_mod": {"mask_mod": lambda b, h, i, j: (j < 7) | ((j <= i) & (j > i - 20))},
}


@pytest.mark.parametrize("case", list(CASES))
def test_tile_map_agrees_with_the_reference(case):
    """Visited tiles cover every allowed pair; full tiles hold only allowed pairs; skipped
    tiles none; no pair is visited twice; the kernel's own default tiles (small ones here)."""
    spec = spec_of(50, **CASES[case])
    allowed = pictures.allowed_map(spec)
    tiles = pictures.visited_tiles(spec, blocks=(8, 16))
    covered = np.zeros(allowed.shape, dtype=int)
    for t in tiles:
        block = allowed[t.i0:t.i1, t.j0:t.j1]
        if t.kind == pictures.FULL:
            assert block.all(), t
        elif t.kind == pictures.SKIPPED:
            assert not block.any(), t
        covered[t.i0:t.i1, t.j0:t.j1] += t.kind != pictures.SKIPPED
    assert covered.max() <= 1
    assert not (allowed & (covered == 0)).any()
    if case in ("causal", "window", "varlen", "mask_mod"):
        assert (covered == 0).any()  # something is saved


def test_mask_mod_tiles_are_skipped_where_the_block_mask_allows_nothing():
    spec = spec_of(128, mask_mod=pictures.prefix_lm)
    tiles = pictures.visited_tiles(spec, blocks=(32, 32))
    skipped = {(t.i0, t.j0) for t in tiles if t.kind == pictures.SKIPPED}
    # prefix 128 covers every key here: nothing to skip; a short prefix skips above the diagonal
    assert not skipped
    short = spec_of(128, mask_mod=lambda b, h, i, j: (j < 32) | (j <= i))
    skipped = {(t.i0, t.j0) for t in pictures.visited_tiles(short, blocks=(32, 32)) if t.kind == pictures.SKIPPED}
    assert skipped == {(i0, j0) for i0 in range(0, 128, 32) for j0 in range(32, 128, 32) if j0 > i0}


def test_micro_tiles_cover_the_tile_once():
    from microattn.kernels.cpu import microkernel

    width = microkernel.micro_tile_width(np.float32)
    for M, N in [(128, 64), (116, 52), (13, 35), (20, 113)]:
        calls, plain = pictures.micro_tile_calls(M, N)
        covered = np.zeros((M, N), dtype=int)
        for i, j, rows, w in calls:
            assert w == width or (microkernel.HALF_TILES and w == width // 2)
            covered[i:i + rows, j:j + w] += 1
        for i, j in plain:
            covered[i, j] += 1
        assert (covered == 1).all(), (M, N)
        assert {rows for _, _, rows, _ in calls} <= {microkernel.ROWS, 4, 2, 1}


def test_rung1_one_row_per_thread():
    tiles = pictures.rung1_tiles()
    owner = pictures.rung1_owner(tiles)
    assert owner.shape == (tiles.resident, tiles.staged)
    assert (owner == np.arange(tiles.resident)[:, None]).all()


def test_rung2_every_score_has_one_owner_with_a_4x4_tile():
    pytest.importorskip("numba.cuda")
    from microattn.kernels.cuda import tiled

    tiling = tiled.GPU_TILINGS[("float32", False)].main
    owner = pictures.rung2_owner(tiling)
    assert (owner >= 0).all()
    counts = np.bincount(owner.ravel(), minlength=tiling.threads)
    assert (counts == (tiling.rows * tiling.cols) // tiling.threads).all()
    # the docstring's example: thread (ty, tx) owns rows 4ty..4ty+3 and keys 4tx..4tx+3
    ty, tx = 2, 5
    assert (owner[4 * ty:4 * ty + 4, 4 * tx:4 * tx + 4] == ty * tiling.threads_cols + tx).all()


def test_ring_work_balances_under_zigzag_and_sums_to_the_causal_count():
    n, size = 32, 4
    total = n * (n + 1) // 2
    owner_c, work_c, step_c = pictures.ring_work(n, size, "contiguous")
    owner_z, work_z, step_z = pictures.ring_work(n, size, "zigzag")
    for work, step in ((work_c, step_c), (work_z, step_z)):
        assert work.sum() == total
        assert ((step >= 0) == np.tri(n, dtype=bool)).all()  # every allowed pair once
    assert (work_c[np.triu_indices(size, 1)] == 0).all()  # rank r skips ranks > r
    assert len(set(work_z.sum(axis=1))) == 1  # zigzag: every rank the same work
    assert work_z.max(axis=0).sum() < work_c.max(axis=0).sum()
    assert owner_c.tolist() == [r for r in range(size) for _ in range(n // size)]
    assert owner_z.tolist()[:8] == [0, 0, 0, 0, 1, 1, 1, 1] and owner_z[-4:].tolist() == [0] * 4
