import pytest

from msgan.io.uids import UidError, check_uid, is_uid, shown

HOSTILE = [
    "../../x",
    "..",
    "1..2",
    "/abs",
    "1.2.3/../4",
    "1." + "2" * 63,
    "1.02.3",
    "01",
    ".1",
    "1.",
    "",
    "1.2 ",
    "1\n2",
]


@pytest.mark.parametrize("uid", ["0", "1.2.840.10008.5.1.4.1.1.2", "2.25.0", "1." + "2" * 62, "1.0.2"])
def test_valid_uids_pass(uid):
    assert is_uid(uid) and check_uid(uid) == uid and shown(uid) == uid


@pytest.mark.parametrize("uid", HOSTILE)
def test_invalid_uids_are_refused_with_the_rule(uid):
    assert not is_uid(uid)
    with pytest.raises(UidError, match="is not a valid DICOM UID") as err:
        check_uid(uid, "SeriesInstanceUID")
    assert "SeriesInstanceUID" in str(err.value) and "at most 64" in str(err.value)
    assert shown(uid).startswith("(invalid UID") and "\n" not in shown(uid)


@pytest.mark.parametrize(
    ("uid", "why"),
    [("1..2", "empty component"), ("1.02", "leading zero"), ("1." + "2" * 63, "65 characters"), ("/abs", "'/'")],
)
def test_the_reason_is_named(uid, why):
    with pytest.raises(UidError, match=why):
        check_uid(uid)
