import numpy as np
import pytest
import requests

from msgan.io.dicom import read_series
from msgan.io.pacs import DicomWebClient, PacsError
from tests.dicom_data import OBLIQUE, write_ct_series


@pytest.fixture
def client(orthanc):
    return DicomWebClient(orthanc["url"], orthanc["user"], orthanc["password"])


def test_store_find_fetch_roundtrip(client, orthanc, tmp_path):
    files, uid, hu = write_ct_series(tmp_path / "src", seed=11, series_name="pacs-rt")
    assert client.store(files) == len(files)
    assert client.store(files[:2]) == 2  # a repeat is accepted, not an error
    found = [s for s in client.find_series(modality="CT") if s.series_uid == uid]
    assert len(found) == 1 and found[0].instances == len(files) and found[0].patient_id == "MSGAN-0001"
    meta = client.series_metadata(found[0].study_uid, uid)
    assert len(meta) == len(files) and meta[0]["00181210"]["Value"] == ["B80f"]
    got = client.fetch_series(found[0].study_uid, uid, tmp_path / "fetched")
    vol = read_series([tmp_path / "fetched"]).volumes[0]
    np.testing.assert_array_equal(vol.image, hu)
    assert vol.geometry.allclose(OBLIQUE, atol=1e-6) and len(got) == len(files)


def test_errors_hold_no_credentials(orthanc):
    bad = DicomWebClient(orthanc["url"], orthanc["user"], "wrong-password")
    with pytest.raises(PacsError, match="refused the credentials") as info:
        bad.find_series()
    assert "wrong-password" not in str(info.value) and "wrong-password" not in repr(bad)
    with pytest.raises(PacsError, match="unreachable"):
        DicomWebClient("http://127.0.0.1:9/dicom-web", "u", "p", timeout=2).find_series()
    with pytest.raises(ValueError, match="DICOMweb root"):
        DicomWebClient("orthanc:8042")
    # Orthanc refuses non-local HTTP and anonymous requests
    assert requests.get(f"{orthanc['rest']}/system", timeout=5).status_code == 401


def _multipart(parts, boundary=b"b0und4ry"):
    body = b"preamble to ignore"
    for p in parts:
        body += b"\r\n--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p
    return (
        body + b"\r\n--" + boundary + b"--\r\n",
        f'multipart/related; type="application/dicom"; boundary={boundary.decode()}',
    )


@pytest.mark.parametrize("chunk", [1, 3, 17, 4096])
def test_multipart_parts_are_written_as_they_arrive(tmp_path, chunk):
    from msgan.io.pacs import write_multipart

    parts = [b"\r\n--b0und4r" * 3 + bytes(range(256)), b"", b"x" * 10000 + b"\r\n--b0und"]  # delimiter look-alikes
    body, ctype = _multipart(parts)
    out = tmp_path / str(chunk)
    out.mkdir()
    files = write_multipart((body[i : i + chunk] for i in range(0, len(body), chunk)), ctype, out)
    assert [f.read_bytes() for f in files] == parts and sorted(p.name for p in out.iterdir()) == [f.name for f in files]


def test_a_truncated_multipart_body_raises_and_leaves_no_half_instance(tmp_path):
    from msgan.io.pacs import write_multipart

    body, ctype = _multipart([b"a" * 100, b"b" * 100])
    with pytest.raises(PacsError, match=r"ended before its closing delimiter \(1 complete parts\)"):
        write_multipart([body[:-60]], ctype, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["00000.dcm"]  # the complete part; no .part file left
    with pytest.raises(PacsError, match="without a boundary"):
        write_multipart([body], "multipart/related", tmp_path)


def test_a_token_in_the_pacs_url_reaches_no_message_or_repr():
    client = DicomWebClient("http://127.0.0.1:9/dicom-web?access_token=SECRET-TOKEN-1", timeout=2)
    with pytest.raises(PacsError, match="unreachable") as info:
        client.find_series()
    assert "SECRET-TOKEN-1" not in str(info.value) and "SECRET-TOKEN-1" not in repr(client)


@pytest.mark.parametrize("char", ["/", "#", "?"])
def test_a_pacs_url_whose_password_holds_an_unencoded_delimiter_is_refused_without_showing_it(char):
    """A generated password with '/' in user:password@ ends the authority for a URL parser: the client would
    connect to a host named after the user and show the password in every message; it is refused, masked."""
    with pytest.raises(ValueError, match="must be percent-encoded") as info:
        DicomWebClient(f"http://alice:S3cr{char}etPass@127.0.0.1:9/dicom-web")
    assert "etPass" not in str(info.value) and "S3cr" not in str(info.value)


def test_a_part_whose_headers_never_end_is_refused_without_reading_the_rest(tmp_path):
    """Memory holds a chunk and a delimiter, also when a broken PACS or proxy sends headers that never end."""
    from msgan.io.pacs import write_multipart

    read = []

    def endless():
        yield b"\r\n--b0und4ry\r\nX-Junk: "
        for _ in range(200):  # 800 kB of one header line (before: all read, searched again per chunk)
            read.append(1)
            yield b"a" * 4096

    ctype = 'multipart/related; type="application/dicom"; boundary=b0und4ry'
    with pytest.raises(PacsError, match="headers longer than"):
        write_multipart(endless(), ctype, tmp_path)
    assert len(read) < 20 and list(tmp_path.iterdir()) == []


def test_find_series_pages_through_more_results_than_a_page(orthanc, tmp_path):
    """Orthanc honours limit/offset: with a page of 2, one request sees 2 of our 5 series (what every pass saw
    of a capped search before paging); find_series sees all 5, each once."""
    import pydicom

    date = "19870605"  # only these 5 series have it in the session's Orthanc
    client = DicomWebClient(orthanc["url"], orthanc["user"], orthanc["password"], page_size=2)
    uids = []
    for k in range(5):
        files, uid, _ = write_ct_series(tmp_path / f"s{k}", image=np.zeros((3, 16, 16), np.float32), seed=300 + k,
                                        series_name=f"paged-{k}")  # fmt: skip
        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyDate = date
            ds.save_as(f)
        assert client.store(files) == len(files)
        uids.append(uid)
    one = requests.get(f"{orthanc['url']}/series", params={"StudyDate": date, "limit": 2, "offset": 0},
                       auth=(orthanc["user"], orthanc["password"]), timeout=30)  # fmt: skip
    assert len(one.json()) == 2
    found = client.find_series("CT", date)
    assert sorted(s.series_uid for s in found) == sorted(uids)


def test_store_streams_the_body_one_file_at_a_time(client, tmp_path):
    """The STOW-RS body is produced lazily: a file is opened only when its part is due, read in chunks of at
    most CHUNK_BYTES, and the length is known before (a Content-Length, no chunked upload); Orthanc takes it."""
    from msgan.io.pacs import CHUNK_BYTES, StowBody

    files, _, _ = write_ct_series(tmp_path / "src", image=np.zeros((3, 16, 16), np.float32), seed=310,
                                  series_name="stream")  # fmt: skip
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (5 * CHUNK_BYTES // 512))  # 2.5 MiB: three reads
    body = StowBody([files[0], big, files[1]])
    parts = iter(body)
    assert body.files_opened == 0 and next(parts).startswith(b"--" + body.boundary.encode())
    assert body.files_opened == 0  # the first part's headers come before its file is opened
    seen = [next(parts)]
    assert body.files_opened == 1 and seen[0] == files[0].read_bytes()[: len(seen[0])]
    seen += list(parts)
    assert body.files_opened == 3 and max(len(p) for p in seen) <= CHUNK_BYTES
    expected = (
        b"".join(
            b"--" + body.boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n"
            for f in (files[0], big, files[1])
        )
        + b"--"
        + body.boundary.encode()
        + b"--\r\n"
    )
    head = b"--" + body.boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
    assert head + b"".join(seen) == expected and len(body) == len(expected)
    prepared = requests.Request("POST", client.url, data=body).prepare()  # as requests sends it
    assert prepared.headers["Content-Length"] == str(len(expected)) and "Transfer-Encoding" not in prepared.headers
    assert prepared.body is body  # not read into memory when the request is built
    assert client.store(files) == len(files)  # streamed to the real PACS
    assert client.store(files) == len(files)  # and again: AlreadyStored is accepted, not an error
