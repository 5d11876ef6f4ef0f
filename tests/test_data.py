"""pipeline.pairs.load_prepared: a folder with bad eye images → patients left out with reasons, or a clear error with --strict."""
import shutil

import pytest

from odir_dual.pipeline.odir import find_layout
from odir_dual.pipeline.pairs import DataError, left_out_summary, load_prepared


@pytest.fixture()
def damaged_odir(tmp_path):
    """A 12-patient synthetic ODIR folder with one truncated JPEG, one text file named .jpg, one missing eye."""
    from odir_dual.pipeline.synthetic import make_synthetic_odir

    root = make_synthetic_odir(tmp_path / "odir", n_patients=12, seed=3, min_px=64, max_px=96, workers=1)
    images = root / "Training Images"
    data = (images / "1_left.jpg").read_bytes()
    (images / "1_left.jpg").write_bytes(data[: len(data) // 2])
    (images / "2_right.jpg").write_text("not a picture")
    (images / "3_left.jpg").unlink()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    return root


def test_bad_eyes_leave_their_patients_out_with_reasons(damaged_odir, tmp_path):
    data = load_prepared(damaged_odir, 48, cache_dir=tmp_path / "cache", workers=1, progress=False)
    patients, left_out = data.patients, data.left_out
    assert data.layout == find_layout(damaged_odir)  # found once, returned for who needs the sheet
    assert sorted(patients["id"]) == [i for i in range(12) if i not in (1, 2, 3)]
    reasons = dict(zip(left_out["id"], left_out["reason"]))
    assert reasons == {1: "truncated JPEG", 2: "not an image", 3: "missing file"}
    assert left_out_summary(left_out).startswith("left out 3 patient(s): ")
    assert all(p.startswith(str(tmp_path / "cache")) for p in patients["left"])
    assert all(p.startswith(str(damaged_odir)) for p in patients["left_src"])


def test_strict_makes_a_bad_eye_fatal_and_names_the_file(damaged_odir, tmp_path):
    with pytest.raises(DataError, match=r"--strict: 3 patient\(s\).*1_left\.jpg: truncated JPEG"):
        load_prepared(damaged_odir, 48, cache_dir=tmp_path / "cache", strict=True, workers=1, progress=False)


def test_the_data_folder_is_searched_once(damaged_odir, tmp_path, monkeypatch):
    """train.py finds the layout once and passes it down: reading the patients does not search the folder again."""
    from odir_dual.pipeline import odir, pairs

    calls = []

    def counted(data_dir):
        calls.append(data_dir)
        return find_layout(data_dir)

    monkeypatch.setattr(odir, "find_layout", counted)
    monkeypatch.setattr(pairs, "find_layout", counted)
    load_prepared(damaged_odir, 48, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert calls == [damaged_odir]
    calls.clear()
    load_prepared(find_layout(damaged_odir), 48, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert calls == []
