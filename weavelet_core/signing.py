"""Signed revisions (opt-in): Ed25519 keys, the signed form of a revision, signing and verifying.

A weaver given a signing key (:class:`SigningKey`) signs every revision it writes, commands included. A trainer
given trusted public keys (:class:`TrustedKeys`) hands a revision to the training loop only when it carries a
valid signature by one of them; an unsigned revision, one signed by another key, or one whose signature does not
match its content is answered ``rejected``, saying so and how to fix it, and nothing of it is applied. The name of
the trusted key that verified a revision is reported in its outcome (``detail["signature"]``) and shown as its
author by ``weavelet history`` and ``weavelet status``. Everything here needs the ``cryptography`` library
(``pip install "weavelet[signing]"``); without it, :class:`~weavelet_core.MissingDriver` says so.

Key files
    ``NAME.key``: the private key, unencrypted, in the OpenSSH format (``-----BEGIN OPENSSH PRIVATE KEY-----``,
    what ``weavelet keygen`` and ``ssh-keygen -t ed25519 -N ''`` write) or as PKCS#8 PEM (``-----BEGIN PRIVATE
    KEY-----``, what ``openssl genpkey -algorithm ed25519`` writes). Refused when its group or others may read it
    (like OpenSSH does): ``chmod 600 NAME.key``.

    ``NAME.pub``: the OpenSSH public key line ``ssh-ed25519 BASE64 NAME``; its third field is the key's name, the
    author shown for what it signed. A file may hold several such lines (blank lines and ``#`` comments are
    skipped); a directory stands for every ``*.pub`` file in it. Refused when others may write it (anyone who
    can add a line there can change the runs): ``chmod go-w``.

Key id
    ``SHA256:`` and the unpadded base64 of the SHA-256 digest of the key's OpenSSH wire blob: the fingerprint
    ``ssh-keygen -lf NAME.pub`` prints. It travels in the revision's ``key_id``.

What is signed (:func:`signed_bytes`)
    The line ``weavelet revision signature v1`` and a newline, then the JSON object of the fields
    :data:`SIGNED_FIELDS` (every field of a revision except ``signature``: run id, number, config, author,
    created_at, id, reverts and key id), keys sorted at every level, no spaces, non-ASCII characters escaped,
    numbers as Python writes them (the shortest text that reads back as the same number). So a signed revision
    cannot be moved to another run or number, nor have its config, author, time or id changed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from weavelet_core.errors import MissingDriver, SigningError, UntrustedRevision
from weavelet_core.protocol import Revision

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from weavelet_core.transport import Transport

SIGNING_KEY_ENV = "WEAVELET_SIGNING_KEY"
"""The path of the private key a weaver signs with when given none (unset or empty: it does not sign)."""
TRUSTED_KEYS_ENV = "WEAVELET_TRUSTED_KEYS"
"""Paths (``.pub`` files or directories, separated by ``os.pathsep``) of the keys trusted when none are given."""
INSTALL_HINT = 'pip install "weavelet[signing]"'
SIGNING_CONTEXT = b"weavelet revision signature v1\n"
"""Prefixed to what is signed, so a weavelet signature can never be mistaken for one over something else."""
SIGNED_FIELDS: tuple[str, ...] = ("run", "revision", "config", "author", "created_at", "id", "reverts", "key_id")
"""The revision fields a signature covers: all but ``signature`` itself."""
KEY_TYPE = "ssh-ed25519"
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}")
KEY_NAME_RULE = "1-64 characters from A-Z a-z 0-9 _ . @ -, starting with a letter or digit"
MAX_KEY_FILE_BYTES = 64 * 1024
"""Key files larger than this are refused unread."""
MAX_TRUSTED_KEYS = 1000
"""At most this many trusted keys (and ``.pub`` files in one directory) are read."""
SIGNATURE_BYTES = 64

UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown_key"
BAD_SIGNATURE = "bad_signature"

SIGN_HINT = (
    "weavelet set --signing-key PATH/NAME.key ... (or WEAVELET_SIGNING_KEY=PATH/NAME.key; Weaver(signing_key=...))"
)

KeySource = Union[str, "os.PathLike[str]"]
SigningKeySource = Union["SigningKey", "Ed25519PrivateKey", str, "os.PathLike[str]"]
TrustedSource = Union["TrustedKeys", KeySource, Iterable[KeySource]]


def require_cryptography() -> None:
    """Raise :class:`~weavelet_core.MissingDriver` with the pip line when ``cryptography`` is not installed."""
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise MissingDriver(
            f"signed revisions need the 'cryptography' library, which is not installed; install it with: {INSTALL_HINT}"
        ) from exc


def signed_bytes(revision: Revision) -> bytes:
    """The exact bytes a revision's signature covers (see the module docstring)."""
    body = {name: getattr(revision, name) for name in SIGNED_FIELDS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return SIGNING_CONTEXT + text.encode("ascii")


def _public_line(public: Ed25519PublicKey) -> str:
    """``ssh-ed25519 BASE64``: the OpenSSH form of a public key, without a name."""
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")


def key_id_of(public: Ed25519PublicKey) -> str:
    """The key id of ``public``: ``SHA256:`` and the fingerprint ``ssh-keygen -lf`` prints."""
    blob = base64.b64decode(_public_line(public).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def validate_key_name(name: object) -> str:
    """Return ``name`` if it is a valid key name, else raise :class:`~weavelet_core.SigningError` saying why."""
    if not isinstance(name, str) or not KEY_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise SigningError(f"invalid key name {name!r}: use {KEY_NAME_RULE} (for example 'alice' or 'ci-bot')")
    return name


# -- keys ----------------------------------------------------------------------------------------------------


class SigningKey:
    """A private Ed25519 key that signs revisions. Load one with :func:`load_signing_key`.

    :param private: the ``cryptography`` private key object.
    :param name: a name for messages (default: the key id); the author a trainer shows comes from its own
        trusted ``.pub`` file, never from here.
    """

    def __init__(self, private: Ed25519PrivateKey, name: str = "") -> None:
        self._private = private
        public = private.public_key()
        self.key_id: str = key_id_of(public)
        self.name: str = name or self.key_id
        self._line = _public_line(public)

    def sign(self, revision: Revision) -> Revision:
        """``revision`` with this key's ``key_id`` and a signature over :func:`signed_bytes` of it."""
        unsigned = dataclasses.replace(revision, key_id=self.key_id, signature="")
        signature = self._private.sign(signed_bytes(unsigned))
        return dataclasses.replace(unsigned, signature=base64.b64encode(signature).decode("ascii"))

    def trusted(self) -> TrustedKey:
        """This key's public half as a :class:`TrustedKey` (named :attr:`name` when that is a valid key name)."""
        name = self.name if KEY_NAME_PATTERN.fullmatch(self.name) else "self"
        return TrustedKey.from_line(f"{self._line} {name}", "the signing key")

    def public_line(self, name: str | None = None) -> str:
        """The ``NAME.pub`` line of this key: ``ssh-ed25519 BASE64 NAME``."""
        return f"{self._line} {validate_key_name(name or self.name)}"

    def __repr__(self) -> str:  # never the secret
        return f"<SigningKey {self.name} {self.key_id}>"


@dataclasses.dataclass(frozen=True)
class TrustedKey:
    """A trusted public key: its ``name`` (shown as the author), ``key_id`` and OpenSSH ``line``."""

    name: str
    key_id: str
    line: str
    public: Ed25519PublicKey = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_line(cls, text: str, source: str) -> TrustedKey:
        """Parse ``ssh-ed25519 BASE64 NAME``; raise :class:`~weavelet_core.SigningError` naming ``source``."""
        require_cryptography()
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        parts = text.split()
        if len(parts) != 3:
            raise SigningError(
                f"{source}: expected one line 'ssh-ed25519 BASE64 NAME' per key (the name is required: it is shown "
                f"as the author of what the key signs), got {len(parts)} field(s)"
            )
        kind, data, name = parts
        if kind != KEY_TYPE:
            raise SigningError(
                f"{source}: a {kind!r} key; weavelet verifies Ed25519 keys only ('{KEY_TYPE} ...'): make one with "
                "weavelet keygen NAME"
            )
        try:
            validate_key_name(name)
        except SigningError as exc:
            raise SigningError(f"{source}: {exc}") from None
        try:
            public = serialization.load_ssh_public_key(f"{kind} {data}".encode("ascii"))
        except (ValueError, UnicodeEncodeError, binascii.Error) as exc:
            raise SigningError(f"{source}: not a valid {KEY_TYPE} public key ({exc})") from None
        if not isinstance(public, Ed25519PublicKey):
            raise SigningError(f"{source}: not an Ed25519 public key")
        return cls(name=name, key_id=key_id_of(public), line=f"{kind} {data} {name}", public=public)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What verifying one revision found. ``ok``: it carries a valid signature by the trusted key ``key`` (its
    name). Otherwise ``problem`` is ``"unsigned"``, ``"unknown_key"`` or ``"bad_signature"`` and ``message``
    says what is wrong and how to fix it."""

    ok: bool
    problem: str = ""
    key: str = ""
    key_id: str = ""
    message: str = ""

    def detail(self) -> dict[str, Any]:
        """The outcome's ``detail["signature"]``: ``{"verified": true, "key": NAME, "key_id": ID}`` or
        ``{"verified": false, "problem": ..., "key_id": ID}``."""
        if self.ok:
            return {"verified": True, "key": self.key, "key_id": self.key_id}
        found: dict[str, Any] = {"verified": False, "problem": self.problem}
        if self.key_id:
            found["key_id"] = self.key_id[:100]
        if self.key:
            found["key"] = self.key
        return found


class TrustedKeys:
    """The public keys a trainer (or a reader) trusts, by key id. Load with :func:`load_trusted_keys`.

    Raises :class:`~weavelet_core.SigningError` when two keys share a name or one key has two names (the author
    shown would be ambiguous), or when more than :data:`MAX_TRUSTED_KEYS` are given.
    """

    def __init__(self, keys: Iterable[TrustedKey]) -> None:
        self._keys: dict[str, TrustedKey] = {}
        names: dict[str, str] = {}
        for key in keys:
            known = self._keys.get(key.key_id)
            if known is not None:
                if known.name != key.name:
                    raise SigningError(
                        f"key {key.key_id} is trusted under two names, {known.name!r} and {key.name!r}: keep one "
                        "(the name is shown as the author of what it signs)"
                    )
                continue
            if key.name in names:
                raise SigningError(
                    f"two different trusted keys are both named {key.name!r} ({names[key.name]} and {key.key_id}): "
                    "rename one (the third field of its .pub line) so authors stay distinguishable"
                )
            if len(self._keys) >= MAX_TRUSTED_KEYS:
                raise SigningError(f"more than {MAX_TRUSTED_KEYS} trusted keys")
            self._keys[key.key_id] = key
            names[key.name] = key.key_id

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> TrustedKeys:
        """From ``ssh-ed25519 BASE64 NAME`` lines (what :meth:`lines` returns)."""
        return cls(TrustedKey.from_line(line, "trusted key") for line in lines)

    def lines(self) -> tuple[str, ...]:
        """The keys as ``ssh-ed25519 BASE64 NAME`` lines: plain strings, for another process."""
        return tuple(key.line for key in self._keys.values())

    def names(self) -> list[str]:
        return [key.name for key in self._keys.values()]

    def get(self, key_id: str) -> TrustedKey | None:
        return self._keys.get(key_id)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self._keys.values())

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def merged(self, other: Iterable[TrustedKey]) -> TrustedKeys:
        """These keys and ``other``'s."""
        return TrustedKeys([*self, *other])

    def describe(self, limit: int = 5) -> str:
        """``alice, bob`` (the first ``limit`` names, then how many more)."""
        names = self.names()
        shown = ", ".join(names[:limit])
        return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "no keys"

    def verify(self, revision: Revision, *, who: str = "this trainer") -> Verdict:
        """Whether ``revision`` carries a valid signature by one of these keys; never raises for what the
        revision holds. ``who`` names the verifier in the messages."""
        from cryptography.exceptions import InvalidSignature

        number = revision.revision
        if not revision.signature and not revision.key_id:
            return Verdict(
                False,
                UNSIGNED,
                message=f"revision {number} is unsigned, and {who} accepts only revisions signed by a trusted key "
                f"({self.describe()}); nothing of it was applied. Write it signed with a trusted key: {SIGN_HINT}",
            )
        key = self._keys.get(revision.key_id)
        if key is None:
            named = f"key {revision.key_id[:100]!r}" if revision.key_id else "a key it does not name"
            return Verdict(
                False,
                UNKNOWN_KEY,
                key_id=revision.key_id,
                message=f"revision {number} is signed by {named}, which {who} does not trust (it trusts "
                f"{self.describe()}); nothing of it was applied. Sign with a trusted key: {SIGN_HINT}; or add that "
                "key's .pub file to the trusted keys (trusted_keys=, WEAVELET_TRUSTED_KEYS) and restart",
            )
        try:
            signature = base64.b64decode(revision.signature.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError, binascii.Error):
            signature = b""
        bad = (
            f"revision {number} carries a signature by key {key.name} ({key.key_id}) that does not match its content: "
            "it was changed after signing, or copied from another run or revision number; nothing of it was applied. "
            f"Write the change again with the key: {SIGN_HINT}"
        )
        if len(signature) != SIGNATURE_BYTES:
            return Verdict(False, BAD_SIGNATURE, key=key.name, key_id=key.key_id, message=bad)
        try:
            key.public.verify(signature, signed_bytes(revision))
        except InvalidSignature:
            return Verdict(False, BAD_SIGNATURE, key=key.name, key_id=key.key_id, message=bad)
        return Verdict(True, key=key.name, key_id=key.key_id)


# -- loading -------------------------------------------------------------------------------------------------


def _read_capped(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SigningError(f"{what} {path} does not exist; make a key pair with: weavelet keygen NAME") from None
    except OSError as exc:
        raise SigningError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SigningError(f"{what} {path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    return data


def _check_not_writable_by_others(path: Path, what: str) -> None:
    """Refuse a trusted-key file or directory that others may write, or that someone else owns (OpenSSH's
    StrictModes)."""
    if os.name != "posix":
        return
    info = path.stat()
    if info.st_mode & 0o022:
        raise SigningError(
            f"{what} {path} may be written by other users (mode {stat.filemode(info.st_mode)}): whoever can add a "
            f"key there can change your runs; fix it with: chmod go-w {path}"
        )
    if info.st_uid not in (os.geteuid(), 0):
        raise SigningError(
            f"{what} {path} is owned by uid {info.st_uid}, neither you nor root: its owner can add keys; fix it with: "
            f"chown {os.geteuid()} {path}"
        )


def load_signing_key(source: SigningKeySource) -> SigningKey:
    """A :class:`SigningKey` from a key object or the path of a private key file (see the module docstring).

    Raises :class:`~weavelet_core.SigningError` for a missing, unreadable, encrypted or non-Ed25519 key file, a
    public key given instead, or one that its group or others may read (``chmod 600``);
    :class:`~weavelet_core.MissingDriver` without ``cryptography``.
    """
    if isinstance(source, SigningKey):
        return source
    require_cryptography()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(source, Ed25519PrivateKey):
        return SigningKey(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"signing_key must be a path or an Ed25519 private key, got {type(source).__name__}")
    path = Path(source).expanduser()
    data = _read_capped(path, "signing key")
    if data.lstrip().startswith(b"ssh-"):
        raise SigningError(f"{path} is a public key; sign with the private key of the pair (NAME.key, not NAME.pub)")
    if os.name == "posix":
        mode = path.stat().st_mode
        if mode & 0o077:
            raise SigningError(
                f"private key {path} may be read by other users (mode {stat.filemode(mode)}); it is refused, as "
                f"OpenSSH refuses such keys; fix it with: chmod 600 {path}"
            )
    try:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            private: Any = serialization.load_ssh_private_key(data, password=None)
        else:
            private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningError(
            f"private key {path} is protected by a passphrase; weavelet reads unencrypted keys only (keep it mode "
            f"0600): make an unencrypted copy with: ssh-keygen -p -N '' -f COPY, or a new key with: weavelet keygen"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningError(
            f"{path} is not a private key weavelet can read ({exc}); expected an Ed25519 key in OpenSSH or PEM form, "
            "as weavelet keygen NAME writes"
        ) from None
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningError(
            f"{path} is a {type(private).__name__} key; weavelet signs with Ed25519 keys only: weavelet keygen NAME"
        )
    return SigningKey(private, name=path.name.removesuffix(".key"))


def signing_key_from_env() -> SigningKey | None:
    """The key named by ``WEAVELET_SIGNING_KEY``, or ``None`` when it is unset or empty."""
    value = os.environ.get(SIGNING_KEY_ENV, "").strip()
    if not value:
        return None
    try:
        return load_signing_key(value)
    except SigningError as exc:
        raise SigningError(f"{SIGNING_KEY_ENV}: {exc}") from None


def _keys_in_file(path: Path) -> list[TrustedKey]:
    _check_not_writable_by_others(path, "trusted key file")
    try:
        text = _read_capped(path, "trusted key file").decode("utf-8")
    except UnicodeDecodeError:
        raise SigningError(f"trusted key file {path} is not text: expected 'ssh-ed25519 BASE64 NAME' lines") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            keys.append(TrustedKey.from_line(line, f"{path}:{number}"))
    if not keys:
        raise SigningError(f"trusted key file {path} holds no key: expected 'ssh-ed25519 BASE64 NAME' lines")
    return keys


def load_trusted_keys(sources: TrustedSource) -> TrustedKeys:
    """The keys in ``sources``: ``.pub`` files or directories (every ``*.pub`` file in one), one path or many.

    Raises :class:`~weavelet_core.SigningError` when a path is missing, unreadable, writable by others, holds a
    malformed or non-Ed25519 key, when a directory holds no ``.pub`` file, when nothing is given, or when keys
    clash (see :class:`TrustedKeys`); :class:`~weavelet_core.MissingDriver` without ``cryptography``.
    """
    if isinstance(sources, TrustedKeys):
        return sources
    require_cryptography()
    paths: Sequence[KeySource] = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    keys: list[TrustedKey] = []
    for source in paths:
        path = Path(source).expanduser()
        if path.is_dir():
            _check_not_writable_by_others(path, "trusted key directory")
            files = sorted(p for p in path.iterdir() if p.name.endswith(".pub") and p.is_file())
            if not files:
                raise SigningError(
                    f"trusted key directory {path} holds no .pub file; copy the signers' NAME.pub files there"
                )
            if len(files) > MAX_TRUSTED_KEYS:
                raise SigningError(f"trusted key directory {path} holds more than {MAX_TRUSTED_KEYS} .pub files")
            for file in files:
                keys += _keys_in_file(file)
        elif path.exists():
            keys += _keys_in_file(path)
        else:
            raise SigningError(
                f"trusted keys: {path} does not exist; give the signers' .pub files or a directory holding them"
            )
    if not keys:
        raise SigningError(
            "no trusted keys given: give .pub files or a directory of them (or leave trusted keys unset to accept "
            "unsigned revisions)"
        )
    return TrustedKeys(keys)


def trusted_keys_from_env() -> TrustedKeys | None:
    """The keys named by ``WEAVELET_TRUSTED_KEYS`` (``os.pathsep``-separated paths), or ``None`` when unset."""
    value = os.environ.get(TRUSTED_KEYS_ENV, "").strip()
    if not value:
        return None
    try:
        return load_trusted_keys([part for part in value.split(os.pathsep) if part.strip()])
    except SigningError as exc:
        raise SigningError(f"{TRUSTED_KEYS_ENV}: {exc}") from None


def resolve_trusted_keys(value: TrustedSource | None) -> TrustedKeys | None:
    """``value`` loaded (see :func:`load_trusted_keys`), or with ``None`` the keys of ``WEAVELET_TRUSTED_KEYS``
    (``None`` when that is unset: nothing is verified)."""
    return trusted_keys_from_env() if value is None else load_trusted_keys(value)


def resolve_signing_key(value: SigningKeySource | None) -> SigningKey | None:
    """``value`` loaded (see :func:`load_signing_key`), or with ``None`` the key of ``WEAVELET_SIGNING_KEY``
    (``None`` when that is unset: nothing is signed)."""
    return signing_key_from_env() if value is None else load_signing_key(value)


# -- key generation ------------------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data`` and exactly ``mode``; never overwrite or follow a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise SigningError(_exists(path)) from None
    except OSError as exc:
        raise SigningError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _exists(path: Path) -> str:
    return (
        f"{path} exists; weavelet keygen never overwrites a key: choose another NAME or --dir, or remove the old pair "
        "first if you mean to replace it (runs that trust the old key will reject what a new one signs)"
    )


def keygen(name: str, directory: str | os.PathLike[str] = ".") -> tuple[Path, Path]:
    """Make an Ed25519 key pair: ``DIRECTORY/NAME.key`` (private, OpenSSH format, mode 0600) and
    ``DIRECTORY/NAME.pub`` (``ssh-ed25519 BASE64 NAME``, mode 0644). ``directory`` (default: the current one) is
    created, mode 0700, when missing. Returns both paths.

    Raises :class:`~weavelet_core.SigningError` for an invalid name or when either file exists (nothing is
    overwritten, nothing written); :class:`~weavelet_core.MissingDriver` without ``cryptography``.
    """
    validate_key_name(name)
    require_cryptography()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(directory).expanduser()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SigningError(f"cannot create the key directory {folder}: {exc.strerror or exc}") from None
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise SigningError(_exists(path))
    private = Ed25519PrivateKey.generate()
    secret = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write_new(private_path, secret, 0o600)
    try:
        _write_new(public_path, (SigningKey(private, name).public_line() + "\n").encode("ascii"), 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


# -- what a signing weaver builds on -------------------------------------------------------------------------


def safe_base(revision: Revision, keys: TrustedKeys) -> bool:
    """Whether a signing weaver may merge onto ``revision``: it verifies with ``keys``, or its config is empty
    (nothing in it could be passed off under the weaver's signature, as after a trainer's fresh start)."""
    return not revision.config or keys.verify(revision).ok


async def newest_safe_base(transport: Transport, run: str, below: int, keys: TrustedKeys) -> Revision | None:
    """The newest stored revision of ``run`` numbered at most ``below`` that is a :func:`safe_base`, or ``None``
    when the kept history holds none."""
    for entry in reversed(await transport.history(run)):
        if isinstance(entry, Revision) and entry.revision <= below and safe_base(entry, keys):
            return entry
    return None


def untrusted(revision: Revision, keys: TrustedKeys, action: str) -> UntrustedRevision:
    """The error of a signing weaver asked to ``action`` (``"merge onto it"``) over an unverifiable revision."""
    verdict = keys.verify(revision, who="this weaver")
    reason = {
        UNSIGNED: "is unsigned",
        UNKNOWN_KEY: f"is signed by key {revision.key_id[:100]!r}, which this weaver does not trust",
        BAD_SIGNATURE: f"has a signature by key {verdict.key} that does not match its content",
    }.get(verdict.problem, "cannot be verified")
    return UntrustedRevision(
        f"revision {revision.revision} of run {revision.run!r} {reason}; this weaver signs, and will not {action}: "
        f"your signature would vouch for a config someone else chose. Look at it (weavelet history {revision.run}); "
        "then write the whole config you want (weavelet set --replace ..., Weaver.set(replace=True)), or, if its "
        "signer is one of yours, trust that key here too (--trusted-keys, WEAVELET_TRUSTED_KEYS, trusted_keys=)",
        run=revision.run,
        revision=revision.revision,
        problem=verdict.problem,
    )


__all__ = [
    "BAD_SIGNATURE",
    "INSTALL_HINT",
    "SIGNED_FIELDS",
    "SIGNING_KEY_ENV",
    "TRUSTED_KEYS_ENV",
    "UNKNOWN_KEY",
    "UNSIGNED",
    "SigningKey",
    "TrustedKey",
    "TrustedKeys",
    "Verdict",
    "keygen",
    "load_signing_key",
    "load_trusted_keys",
    "newest_safe_base",
    "require_cryptography",
    "resolve_signing_key",
    "resolve_trusted_keys",
    "safe_base",
    "signed_bytes",
    "signing_key_from_env",
    "trusted_keys_from_env",
    "untrusted",
    "validate_key_name",
]
