"""The one attribute-pattern syntax (find-pairs, pacs-sync): Keyword=REGEX, whole value, any case, any value."""

import time

import pydicom
import pytest

from msgan.io import patterns
from msgan.io.patterns import PatternError, parse


def test_a_pattern_matches_the_whole_value_ignoring_case():
    p = parse("ConvolutionKernel=B70f")
    assert p.keyword == "ConvolutionKernel" and p.regex == "B70f" and str(p) == "ConvolutionKernel=B70f"
    assert p.matches({"ConvolutionKernel": "B70f"})
    assert p.matches({"ConvolutionKernel": "b70F"})  # case is ignored
    assert not p.matches({"ConvolutionKernel": "B70f_x"})  # the whole value, not a part of it
    assert not p.matches({"ConvolutionKernel": "xB70f"})
    assert parse("SeriesDescription=.*ARTERIAL.*").matches({"SeriesDescription": "CT Thorax arterial 1.0"})
    assert "whole" in p.describe() and "ignoring case" in p.describe()


def test_any_value_of_a_multi_valued_attribute_matches():
    siemens = {"ConvolutionKernel": ["Br40d", "3"]}
    assert parse("ConvolutionKernel=Br40d").matches(siemens)
    assert parse("ConvolutionKernel=3").matches(siemens)
    assert not parse("ConvolutionKernel=Br40").matches(siemens)
    ds = pydicom.Dataset()
    ds.ConvolutionKernel = ["Br40d", "3"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    values = patterns.dataset_values(ds, ["ConvolutionKernel", "ImageType", "SeriesDescription"])
    assert values == {"ConvolutionKernel": ["Br40d", "3"], "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    assert parse("ConvolutionKernel=br40D").matches(values) and parse("ImageType=axial").matches(values)


def test_a_missing_attribute_matches_nothing_and_an_empty_one_matches_caret_dollar():
    assert not parse("SeriesDescription=.*").matches({})
    assert parse("SeriesDescription=.*").matches({"SeriesDescription": ""})
    assert parse("SeriesDescription=^$").matches({"SeriesDescription": ""})
    assert not parse("SeriesDescription=^$").matches({"SeriesDescription": "x"})


def test_every_pattern_of_a_side_must_match():
    side = patterns.parse_all(["ConvolutionKernel=B70f", "Modality=CT"])
    assert patterns.matches_all(side, {"ConvolutionKernel": "B70f", "Modality": "CT"})
    assert not patterns.matches_all(side, {"ConvolutionKernel": "B70f", "Modality": "MR"})
    assert patterns.keywords([*side, parse("Modality=MR")]) == ["ConvolutionKernel", "Modality"]


def test_only_the_first_equals_sign_separates_keyword_and_regex():
    p = parse("SeriesDescription=a=b")
    assert p.regex == "a=b" and p.matches({"SeriesDescription": "A=B"})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Kernel=B70f", "'Kernel' is not a DICOM keyword"),
        ("convolutionkernel=B70f", "did you mean ConvolutionKernel"),
        ("ConvolutionKernl=B70f", "did you mean ConvolutionKernel"),
        ("0018,1210=B70f", "not a DICOM keyword"),
        ("ConvolutionKernel", "a pattern is KEYWORD=REGEX"),
        ("ConvolutionKernel=", "empty regular expression"),
        ("ConvolutionKernel=B[70f", "not a valid regular expression .unterminated character set at position 1"),
        ("ReferencedSeriesSequence=1.2", "a sequence"),
        ("PixelData=x", "binary data"),
    ],
)
def test_a_bad_pattern_is_refused_naming_it(text, why):
    with pytest.raises(PatternError, match=why) as err:
        parse(text)
    assert repr(text[:40]) in str(err.value) or text[:40] in str(err.value)
    assert isinstance(err.value, ValueError)  # the CLI's bad-input exit


@pytest.mark.parametrize(
    ("regex", "why"),
    [
        ("(a+)+b", "repeats a repetition"),
        ("(.*a){2,5}b", "repeats a repetition"),
        ("(ab|a)*c", "repeats an alternation"),
        ("(?=(a*)*)b", "repeats a repetition"),
        ("a?a?a?a?aaaa", "at most 3"),
        (".*a.*a.*a.*b", "at most 3"),
        ("(ab|c)(de|f)(gh|i)(jk|l)(mn|o)", "5 alternations"),
        ("x" * 201, "above the 200"),
    ],
)
def test_regexes_that_can_take_exponential_time_are_refused(regex, why):
    with pytest.raises(PatternError, match=why):
        parse(f"SeriesDescription={regex}")


def test_the_worst_accepted_regex_stays_fast_on_the_longest_value():
    p = parse("SeriesDescription=.*a.*a.*b")  # three repetitions: the most allowed
    longest = "a" * patterns.MAX_VALUE_CHARS
    t0 = time.perf_counter()
    assert not p.matches({"SeriesDescription": longest})
    assert time.perf_counter() - t0 < 1.0


def test_values_beyond_the_caps_are_not_looked_at():
    p = parse("SeriesDescription=.*ART.*")
    assert not p.matches({"SeriesDescription": "ART" + "x" * patterns.MAX_VALUE_CHARS})  # too long: never matches
    many = ["x"] * patterns.MAX_VALUES + ["ART"]
    assert not p.matches({"SeriesDescription": many})  # only the first MAX_VALUES values
    assert p.matches({"SeriesDescription": many[-patterns.MAX_VALUES :]})
    assert not parse("SeriesDescription=.*").matches({"SeriesDescription": b"binary"})


def test_values_from_dicom_json():
    item = {
        "00181210": {"vr": "SH", "Value": ["Br64d", "3"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00180050": {"vr": "DS", "Value": [3.0]},
        "00200011": {"vr": "IS", "Value": [7]},
        "0008103E": {"vr": "LO"},  # present without a value
        "nonsense": {"Value": ["x"]},
        "00091010": "not an object",
    }
    got = patterns.json_values(item)
    assert got["ConvolutionKernel"] == ["Br64d", "3"] and got["PatientName"] == ["Doe^Jane"]
    assert got["SliceThickness"] == ["3"] and got["SeriesNumber"] == ["7"]
    assert "SeriesDescription" not in got and len(got) == 4
    assert patterns.json_values(item, ["ConvolutionKernel"]) == {"ConvolutionKernel": ["Br64d", "3"]}
    assert parse("SliceThickness=3").matches(got) and parse("PatientName=doe\\^jane").matches(got)


def test_pacs_syncs_older_settings_search_and_count_case():
    kernel = patterns.legacy("ConvolutionKernel", "B[6-9]0")
    assert kernel.matches({"ConvolutionKernel": "B80f"})  # found inside the value
    assert not kernel.matches({"ConvolutionKernel": "b80f"})  # case counts, as before
    assert kernel.matches({"ConvolutionKernel": ["Br40d", "B60f"]})  # any value
    with pytest.raises(PatternError, match="repeats a repetition"):
        patterns.legacy("SeriesDescription", "(a+)+")
    # what pacs-sync accepted before the shared syntax still works (the count applies to new patterns only)
    many = patterns.legacy("SeriesDescription", ".*CHEST.*ABD.*PELVIS.*")
    assert many.matches({"SeriesDescription": "CT CHEST ABD PELVIS W"})
    assert patterns.legacy("SeriesDescription", r"(ax|cor)(ial)?\s*\d+(\.\d+)?\s*mm").matches(
        {"SeriesDescription": "Axial 2.5 mm"[0].lower() + "xial 2.5 mm"}
    )
    with pytest.raises(PatternError, match="repetitions"):
        parse("SeriesDescription=.*CHEST.*ABD.*PELVIS.*")
