import pytest

from competition.files import atomic_output, partial_path


def test_complete_write_is_renamed_into_place(tmp_path):
    target = tmp_path / "out.csv"
    with atomic_output(target) as partial:
        assert partial == partial_path(target) and partial.parent == tmp_path
        partial.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new" and not partial.exists()


def test_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "best.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as partial:
        partial.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and not partial_path(target).exists()
