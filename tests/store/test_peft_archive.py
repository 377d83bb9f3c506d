"""Reading a PEFT adapter from a directory or an uploaded archive: every form gives the same
artifact; links, path traversal, pickles and oversize members are refused."""

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from peft import LoraConfig, TaskType
from store_cases import TINY_ARCH, hf_fingerprint, save_peft

from prefixserve.adapters_store import import_peft
from prefixserve.adapters_store.peft_import import MAX_ARCHIVE_ENTRIES, read_adapter_files
from prefixserve.config import AdapterLimits
from prefixserve.errors import AdapterError

LIMITS = AdapterLimits()
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("peft") / "my-adapter"
    save_peft(path, LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj", "v_proj"],
                               init_lora_weights=False))
    return path


@pytest.fixture(scope="module")
def fingerprint(tiny_hf):
    return hf_fingerprint(tiny_hf)


@pytest.fixture(scope="module")
def expected(adapter_dir, fingerprint) -> bytes:
    return import_peft(adapter_dir, arch=TINY_ARCH, fingerprint=fingerprint, limits=LIMITS)


def tar_bytes(entries: dict[str, bytes], mode: str = "w", links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """entries: name -> content; links: name -> (tar type, target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, (link_type, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = link_type, target
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # unix mode: symlink
            archive.writestr(info, target)
    return buf.getvalue()


def adapter_files(adapter_dir: Path, folder: str = "") -> dict[str, bytes]:
    files = {folder + name: (adapter_dir / name).read_bytes() for name in FILES}
    files[folder + "README.md"] = b"# my adapter\n"
    return files


def do_import(source, fingerprint, limits=LIMITS):
    return import_peft(source, arch=TINY_ARCH, fingerprint=fingerprint, limits=limits)


@pytest.mark.parametrize("form", ["tar", "tar.gz", "zip", "tar_nested", "tgz_nested", "zip_nested", "dot_slash"])
def test_every_archive_form_gives_the_same_artifact(form, adapter_dir, fingerprint, expected):
    nested = "my-adapter/" if form.endswith("nested") else "./" if form == "dot_slash" else ""
    files = adapter_files(adapter_dir, nested)
    if form.startswith("zip"):
        data = zip_bytes(files)
    else:
        data = tar_bytes(files, mode="w:gz" if form.startswith(("tar.gz", "tgz")) else "w")
    assert do_import(data, fingerprint) == expected


def test_archive_paths_and_nested_directory(adapter_dir, fingerprint, expected, tmp_path):
    (tmp_path / "a.tgz").write_bytes(tar_bytes(adapter_files(adapter_dir, "x/"), mode="w:gz"))
    (tmp_path / "a.zip").write_bytes(zip_bytes(adapter_files(adapter_dir)))
    assert do_import(tmp_path / "a.tgz", fingerprint) == expected
    assert do_import(tmp_path / "a.zip", fingerprint) == expected
    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    for name, content in adapter_files(adapter_dir).items():
        (outer / "inner" / name).write_bytes(content)
    assert do_import(outer, fingerprint) == expected


def test_only_the_two_files_are_read(adapter_dir):
    config, weights = read_adapter_files(tar_bytes(adapter_files(adapter_dir)), LIMITS)
    assert config == (adapter_dir / FILES[0]).read_bytes() and weights == (adapter_dir / FILES[1]).read_bytes()


def _files(adapter_dir, **extra):
    return {**adapter_files(adapter_dir), **extra}


REFUSED = {
    # id: (make(adapter_dir, tmp_path) -> source, limits, message regex)
    "tar_parent_traversal": (lambda d, t: tar_bytes(_files(d, **{"../evil.txt": b"x"})), LIMITS,
                             r"relative member paths inside the archive, found '../evil.txt'"),
    "tar_nested_traversal": (lambda d, t: tar_bytes(_files(d, **{"a/../../evil": b"x"})), LIMITS,
                             r"found 'a/../../evil'"),
    "tar_absolute": (lambda d, t: tar_bytes(_files(d, **{"/etc/evil": b"x"})), LIMITS, r"found '/etc/evil'"),
    "zip_traversal": (lambda d, t: zip_bytes(_files(d, **{"../../evil": b"x"})), LIMITS, r"found '../../evil'"),
    "zip_windows_absolute": (lambda d, t: zip_bytes(_files(d, **{"C:/evil": b"x"})), LIMITS, r"found 'C:/evil'"),
    "tar_symlink": (lambda d, t: tar_bytes({"adapter_config.json": (d / FILES[0]).read_bytes()},
                                           links={"adapter_model.safetensors": (tarfile.SYMTYPE, "/etc/passwd")}),
                    LIMITS, r"regular files in the archive, found 'adapter_model.safetensors' \(a link"),
    "tar_hardlink": (lambda d, t: tar_bytes(_files(d), links={"extra": (tarfile.LNKTYPE, "adapter_config.json")}),
                     LIMITS, r"found 'extra' \(a link or special file\)"),
    "tar_device": (lambda d, t: tar_bytes(_files(d), links={"dev": (tarfile.CHRTYPE, "")}), LIMITS,
                   r"found 'dev' \(a link or special file\)"),
    "zip_symlink": (lambda d, t: zip_bytes({"adapter_config.json": (d / FILES[0]).read_bytes()},
                                           symlinks={"adapter_model.safetensors": "/etc/passwd"}), LIMITS,
                    r"found 'adapter_model.safetensors' \(a link or special file\)"),
    "pickled_only_tar": (lambda d, t: tar_bytes({"adapter_config.json": (d / FILES[0]).read_bytes(),
                                                 "adapter_model.bin": b"\x80\x04 not unpickled"}), LIMITS,
                         r"found only the pickled adapter_model.bin, which is never unpickled: re-save .*"
                         r"safe_serialization=True"),
    "pickled_only_dir": (lambda d, t: _write(t, {"adapter_config.json": (d / FILES[0]).read_bytes(),
                                                 "adapter_model.bin": b"\x80\x04 not unpickled"}), LIMITS,
                         r"never unpickled"),
    "no_weights": (lambda d, t: zip_bytes({"adapter_config.json": (d / FILES[0]).read_bytes()}), LIMITS,
                   r"expected adapter_model.safetensors next to adapter_config.json, found none"),
    "no_config": (lambda d, t: zip_bytes({"adapter_model.safetensors": b"x"}), LIMITS,
                  r"one adapter_config.json .* found 0 among \['adapter_model.safetensors'\]"),
    "two_adapters": (lambda d, t: tar_bytes({**adapter_files(d, "a/"), **adapter_files(d, "b/")}), LIMITS,
                     r"one adapter_config.json .* found 2"),
    "too_deep": (lambda d, t: tar_bytes(adapter_files(d, "a/b/")), LIMITS,
                 r"at the top or under one folder, found 'a/b/adapter_config.json'"),
    "needed_files_too_big": (lambda d, t: tar_bytes(adapter_files(d)), AdapterLimits(max_artifact_bytes=4096),
                             r"adapter_config.json and adapter_model.safetensors of at most 4096 bytes together, "
                             r"found \d+"),
    "archive_too_big": (lambda d, t: tar_bytes(_files(d, junk=bytes(64 << 10))),
                        AdapterLimits(max_artifact_bytes=32 << 10), r"archive of at most 65536 bytes uncompressed"),
    "too_many_entries": (lambda d, t: zip_bytes(_files(d, **{f"n{i}": b"" for i in range(MAX_ARCHIVE_ENTRIES)})),
                         LIMITS, rf"at most {MAX_ARCHIVE_ENTRIES} entries \(files, folders and links together\)"),
    # Folders cost a header read (and, gzipped, decompression) like files: 200,000 of them took 6 s of CPU.
    "too_many_folders_tar_gz": (lambda d, t: _with_folders(d, MAX_ARCHIVE_ENTRIES, "tar"), LIMITS,
                                rf"at most {MAX_ARCHIVE_ENTRIES} entries"),
    "too_many_folders_zip": (lambda d, t: _with_folders(d, MAX_ARCHIVE_ENTRIES, "zip"), LIMITS,
                             rf"at most {MAX_ARCHIVE_ENTRIES} entries"),
    "config_nested_too_deeply": (lambda d, t: zip_bytes({**adapter_files(d), "adapter_config.json": _deep_json()}),
                                 LIMITS, r"adapter_config.json to be a flat JSON object, found JSON nested too deeply"),
    "weights_header_nested_too_deeply": (lambda d, t: zip_bytes({**adapter_files(d),
                                                                 "adapter_model.safetensors": _deep_header()}),
                                         LIMITS, r"expected a JSON safetensors header, found JSON nested too deeply"),
    "not_an_archive": (lambda d, t: b"just some text, not an adapter", LIMITS,
                       r"a .tar, .tar.gz/.tgz or .zip of one, found an unreadable archive"),
    "truncated_gzip": (lambda d, t: tar_bytes(adapter_files(d), mode="w:gz")[:300], LIMITS, r"unreadable archive"),
    "repeated_name": (lambda d, t: _tar_with_repeat(d), LIMITS,
                      r"each file once in the archive, found a name repeated"),
    "truncated_zip": (lambda d, t: zip_bytes(adapter_files(d))[:-40], LIMITS, r"unreadable archive"),
    "missing_path": (lambda d, t: t / "nope", LIMITS, r"adapter directory or archive at '.*nope', found nothing"),
    "config_not_json": (lambda d, t: zip_bytes({**adapter_files(d), "adapter_config.json": b"{peft"}), LIMITS,
                        r"adapter_config.json to be JSON"),
    "weights_not_safetensors": (lambda d, t: zip_bytes({**adapter_files(d), "adapter_model.safetensors": b"\x80"}),
                                LIMITS, r"expected a safetensors file"),
}


def _tar_with_repeat(adapter_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in [*adapter_files(adapter_dir).items(), ("./adapter_config.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _with_folders(adapter_dir: Path, num_folders: int, kind: str) -> bytes:
    """The adapter's files after `num_folders` empty folders (a few KB once compressed)."""
    if kind == "zip":
        return zip_bytes({**{f"d{i}/": b"" for i in range(num_folders)}, **adapter_files(adapter_dir)})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(num_folders):
            info = tarfile.TarInfo(f"d{i}")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, content in adapter_files(adapter_dir).items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def _deep_header() -> bytes:
    header = b'{"a": ' + _deep_json() + b"}"
    return len(header).to_bytes(8, "little") + header


def _write(path: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (path / name).write_bytes(content)
    return path


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsafe_or_unusable_upload_is_refused(case, adapter_dir, fingerprint, tmp_path):
    make, limits, message = REFUSED[case]
    with pytest.raises(AdapterError, match=message):
        do_import(make(adapter_dir, tmp_path), fingerprint, limits)
