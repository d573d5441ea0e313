"""Signed revisions: keys, the signed form, and a trainer with trusted keys against real transports (file://, NATS,
Redis). With signing on, what a mere store writer writes (unsigned, another key's, tampered, replayed onto another
run or number) is rejected with an outcome saying so, and nothing of it reaches the training loop; the signer's
stop always stops."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from weavelet_core import MissingDriver, Outcome, Revision, WeaveletProcess, Weaver, open_transport
from weavelet_core.errors import SigningError, UntrustedRevision
from weavelet_core.protocol import decode, encode, to_dict
from weavelet_core.signing import (
    SIGNED_FIELDS,
    TRUSTED_KEYS_ENV,
    TrustedKeys,
    keygen,
    load_signing_key,
    load_trusted_keys,
    signed_bytes,
)

WAIT = 30.0  # generous: two shared cores


@dataclasses.dataclass
class Keys:
    trusted: Path  # a directory holding alice.pub
    alice: Path  # alice.key
    mallory: Path  # mallory.key, trusted nowhere


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    trusted = tmp_path / "trusted"
    alice, _ = keygen("alice", tmp_path / "alice")
    trusted.mkdir(mode=0o755)
    shutil.copy(tmp_path / "alice" / "alice.pub", trusted / "alice.pub")
    mallory, _ = keygen("mallory", tmp_path / "mallory")
    return Keys(trusted=trusted, alice=alice, mallory=mallory)


@pytest.fixture(params=["file", "nats", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    found: str = request.getfixturevalue(f"weavelet_{request.param}_url")
    return found


def put(url: str, revision: Revision) -> None:
    """Store ``revision`` as a writer with the store's credentials but no trusted key would."""

    async def write() -> None:
        transport = open_transport(url)
        await transport.connect()
        try:
            await transport.put(revision)
        finally:
            await transport.aclose()

    anyio.run(write, backend="asyncio")


class Loop:
    """A WeaveletProcess polled like a training loop: each revision handed out is reported applied."""

    def __init__(self, process: WeaveletProcess) -> None:
        self.process = process
        self.handed: list[Revision] = []

    def step(self) -> None:
        got = self.process.poll()
        if got is not None:
            self.handed.append(got)
            self.process.report_outcome(got.revision, "applied", step=len(self.handed))

    def outcome(self, weaver: Weaver, revision: Revision, timeout: float = WAIT) -> Outcome:
        """Step until ``revision`` has its outcome; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.step()
            found = weaver.outcome(revision.run, revision.revision)
            if found is not None and found.revision_id == revision.id:
                return found
            time.sleep(0.02)
        raise AssertionError(f"revision {revision.revision} of run {revision.run!r} got no outcome in {timeout}s")


@pytest.fixture
def run() -> str:
    return f"signed-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def trainer(url: str, run: str, keys: Keys) -> Iterator[WeaveletProcess]:
    process = WeaveletProcess(run, url, trusted_keys=keys.trusted, heartbeat_interval=0.2, status_interval=0.05)
    process.start(timeout=WAIT)
    try:
        yield process
    finally:
        process.stop(timeout=5)


# -- the signed form -------------------------------------------------------------------------------------------


def test_every_revision_field_but_the_signature_is_signed() -> None:
    fields = {field.name for field in dataclasses.fields(Revision)}
    assert set(SIGNED_FIELDS) == fields - {"signature"}, "a new Revision field must be signed (or say why not)"


@pytest.mark.parametrize(
    "change",
    [
        {"run": "another-run"},
        {"revision": 8},
        {"config": {"lr": 999}},
        {"config": {"lr": 0.1, "stop": {"token": "x", "incarnation": "y"}}},
        {"author": "root@vm"},
        {"created_at": 1.0},
        {"id": "0" * 32},
        {"reverts": 3},
        {"key_id": "SHA256:" + "A" * 43},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_signature_covers_every_field(tmp_path: Path, change: dict[str, object]) -> None:
    private, public = keygen("alice", tmp_path)
    trusted = load_trusted_keys(public)
    signed = load_signing_key(private).sign(Revision(run="r", revision=7, config={"lr": 0.1}, author="ana@laptop"))
    assert trusted.verify(signed).ok
    forged = dataclasses.replace(signed, **change)  # type: ignore[arg-type]
    verdict = trusted.verify(forged)
    assert not verdict.ok
    assert verdict.problem == ("unknown_key" if "key_id" in change else "bad_signature")


def test_a_signed_revision_verifies_after_the_wire(tmp_path: Path) -> None:
    private, public = keygen("alice", tmp_path)
    config = {"lr": 1e-4, "β": [0.9, 0.999], "nested": {"z": 1, "a": -0.0, "big": 2**60}, "on": True, "none": None}
    signed = load_signing_key(private).sign(Revision(run="r", revision=1, config=config, author="ána"))
    received = decode(encode(signed), Revision)
    assert load_trusted_keys(public).verify(received).ok
    assert signed_bytes(received).startswith(b"weavelet revision signature v1\n")


def test_an_unsigned_revision_is_written_as_before() -> None:
    body = to_dict(Revision(run="r", revision=1, config={}))
    assert "signature" not in body
    assert "key_id" not in body
    old = json.dumps({"v": 2, "kind": "revision", "run": "r", "revision": 1, "config": {}}).encode()
    assert decode(old, Revision).signature == ""


# -- keys ------------------------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    private, public = keygen("alice", tmp_path / "keys")
    assert (private.name, public.name) == ("alice.key", "alice.pub")
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    line = public.read_text()
    assert line.startswith("ssh-ed25519 ")
    assert line.endswith(" alice\n")
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(SigningError, match="never overwrites"):
        keygen("alice", tmp_path / "keys")
    public.unlink()
    with pytest.raises(SigningError, match=r"alice\.key exists"):
        keygen("alice", tmp_path / "keys")  # one half present is refused too
    assert private.read_bytes() == before[0]
    assert not public.exists()
    with pytest.raises(SigningError, match="invalid key name"):
        keygen("../evil", tmp_path)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_the_key_id_is_the_fingerprint_ssh_keygen_prints(tmp_path: Path) -> None:
    private, public = keygen("alice", tmp_path)
    shown = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True, timeout=30)
    assert load_signing_key(private).key_id == shown.stdout.split()[1]
    # ssh-keygen reads the private key too: the pair is an ordinary OpenSSH pair.
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, timeout=30)
    assert derived.stdout.split()[:2] == public.read_text().split()[:2]


def test_key_files_others_can_read_or_write_are_refused(tmp_path: Path) -> None:
    private, public = keygen("alice", tmp_path)
    private.chmod(0o640)
    with pytest.raises(SigningError, match=f"chmod 600 {private}"):
        load_signing_key(private)
    private.chmod(0o600)
    with pytest.raises(SigningError, match="is a public key"):
        load_signing_key(public)
    public.chmod(0o664)
    with pytest.raises(SigningError, match=f"chmod go-w {public}"):
        load_trusted_keys(public)
    public.chmod(0o644)
    tmp_path.chmod(0o777)
    try:
        with pytest.raises(SigningError, match="chmod go-w"):
            load_trusted_keys(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_trusted_keys_refuse_what_is_missing_ambiguous_or_not_ed25519(tmp_path: Path) -> None:
    with pytest.raises(SigningError, match="does not exist"):
        load_trusted_keys(tmp_path / "missing.pub")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SigningError, match=r"holds no \.pub file"):
        load_trusted_keys(tmp_path / "empty")
    keygen("alice", tmp_path / "a")
    keygen("alice", tmp_path / "b")  # another key, the same name
    with pytest.raises(SigningError, match="both named 'alice'"):
        load_trusted_keys([tmp_path / "a" / "alice.pub", tmp_path / "b" / "alice.pub"])
    rsa = tmp_path / "rsa.pub"
    rsa.write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ bob\n")
    with pytest.raises(SigningError, match="Ed25519 keys only"):
        load_trusted_keys(rsa)
    nameless = tmp_path / "nameless.pub"
    nameless.write_text(" ".join((tmp_path / "a" / "alice.pub").read_text().split()[:2]) + "\n")
    with pytest.raises(SigningError, match="the name is required"):
        load_trusted_keys(nameless)
    assert load_trusted_keys(tmp_path / "a").names() == ["alice"]


def test_a_trainer_meant_to_verify_never_starts_without_its_keys(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = (tmp_path / "store").as_uri()
    with pytest.raises(SigningError, match="does not exist"):
        WeaveletProcess("r", url, trusted_keys=tmp_path / "nowhere")
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys.trusted))
    process = WeaveletProcess("r", url)
    assert process.trusted_keys is not None
    assert process.trusted_keys.names() == ["alice"]
    assert process.sidecar_config().trusted_keys == process.trusted_keys.lines()
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SigningError, match=f"{TRUSTED_KEYS_ENV}: .*does not exist"):
        WeaveletProcess("r", url)


def test_without_cryptography_the_error_names_the_extra(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    from tests.cli.conftest import blocker_env

    code = (
        "from weavelet_core import signing\n"
        "try:\n"
        f"    signing.keygen('alice', {str(tmp_path)!r})\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**isolated_env, **blocker_env(tmp_path, "cryptography")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MissingDriver "), done.stdout
    assert 'install it with: pip install "weavelet[signing]"' in done.stdout
    assert issubclass(MissingDriver, ImportError)


# -- a trainer with trusted keys, on each transport -------------------------------------------------------------


def test_only_what_a_trusted_key_signed_reaches_the_trainer(
    url: str, run: str, keys: Keys, trainer: WeaveletProcess
) -> None:
    loop = Loop(trainer)
    with (
        Weaver(url, signing_key=keys.alice) as alice,
        Weaver(url) as anyone,
        Weaver(url, signing_key=keys.mallory) as mallory,
    ):
        signed = alice.set(run, {"lr": 0.1})
        applied = loop.outcome(alice, signed)
        assert applied.result == "applied", applied
        assert applied.detail["signature"] == {"verified": True, "key": "alice", "key_id": signed.key_id}

        def refused(revision: Revision, problem: str, *words: str) -> None:
            outcome = loop.outcome(alice, revision)
            assert outcome.result == "rejected", outcome
            assert outcome.detail["signature"]["problem"] == problem
            assert outcome.message is not None
            for word in (*words, "nothing of it was applied", "--signing-key"):
                assert word in outcome.message, outcome.message

        refused(anyone.set(run, {"lr": 0.2}), "unsigned", "revision 2 is unsigned", "trusted key (alice)")
        refused(mallory.set(run, {"lr": 0.3}, replace=True), "unknown_key", "does not trust", "WEAVELET_TRUSTED_KEYS")

        # The store entry rewritten with another config, the signature kept.
        genuine = load_signing_key(keys.alice).sign(Revision(run=run, revision=4, config={"lr": 0.4}))
        put(url, dataclasses.replace(genuine, config={"lr": 999}))
        refused(alice.revision(run, 4), "bad_signature", "does not match its content", "key alice")

        # Replays: revision 1 again as revision 5; a revision signed for another run copied here as revision 6.
        put(url, dataclasses.replace(alice.revision(run, 1), revision=5))
        refused(alice.revision(run, 5), "bad_signature", "copied from another run or revision number")
        elsewhere = alice.set(f"{run}-other", {"lr": 0.6})
        put(url, dataclasses.replace(elsewhere, run=run, revision=6))
        refused(alice.revision(run, 6), "bad_signature")

        # A stop from a writer without the key is refused, and the run goes on.
        unsigned_stop = anyone.command(run, "stop")
        assert isinstance(unsigned_stop, Revision)
        refused(unsigned_stop, "unsigned")
        assert [r.revision for r in loop.handed] == [1]
        status = alice.status(run)
        assert status is not None
        assert status.live
        deadline = time.monotonic() + WAIT
        while (last := (alice.status(run) or status).last_outcome or {}).get("revision") != 7:
            assert time.monotonic() < deadline, last
            time.sleep(0.05)
        assert last["result"] == "rejected"

        # The key's stop always stops, and carries nothing a forger wrote: it is built on revision 1's config.
        with pytest.warns(RuntimeWarning, match="revision 7 of run .* is unsigned; signed on top of revision 1"):
            stop = alice.command(run, "stop")
        assert isinstance(stop, Revision)
        assert loop.outcome(alice, stop).result == "applied"
        assert [r.revision for r in loop.handed] == [1, 8]
        assert loop.handed[-1].config["lr"] == 0.1
        assert loop.handed[-1].config["stop"]["incarnation"] == trainer.incarnation

        # A signing weaver never merges onto, nor reverts to, what it cannot verify.
        with pytest.raises(UntrustedRevision, match=r"revision 2 of run .* is unsigned"):
            alice.revert(run, 2)
        anyone.set(run, {"lr": 0.9})
        with pytest.raises(UntrustedRevision, match="will not merge a change onto it"):
            alice.set(run, {"momentum": 0.9})

    trusted = load_trusted_keys(keys.trusted)
    assert all(trusted.verify(revision).ok for revision in loop.handed)


# -- file:// only: a rewritten entry, a fresh start, a training loop --------------------------------------------


def test_a_stored_revision_rewritten_in_place_is_rejected(tmp_path: Path, keys: Keys) -> None:
    from weavelet_file.transport import FileTransport

    url, run = (tmp_path / "store").as_uri(), "rewritten"
    with Weaver(url, signing_key=keys.alice) as alice:
        signed = alice.set(run, {"lr": 0.1})  # written ahead of the run's first start
        body = to_dict(signed)
        body["config"] = {"lr": 999}

        async def rewrite() -> None:
            transport = FileTransport(url)
            await transport.connect()
            await transport.put_raw(run, 1, json.dumps(body).encode())
            await transport.aclose()

        anyio.run(rewrite)
        with WeaveletProcess(run, url, trusted_keys=keys.trusted, heartbeat_interval=0.2) as process:
            loop = Loop(process)
            outcome = loop.outcome(alice, signed)
            assert outcome.result == "rejected"
            assert "does not match its content" in (outcome.message or "")
            assert loop.handed == []


def test_a_fresh_start_clears_with_its_own_unsigned_revision_and_signed_writes_build_on_it(
    tmp_path: Path, keys: Keys, recwarn: pytest.WarningsRecorder
) -> None:
    url, run = (tmp_path / "store").as_uri(), "fresh"
    with Weaver(url, signing_key=keys.alice) as alice:
        with WeaveletProcess(run, url, trusted_keys=keys.trusted, heartbeat_interval=0.2) as first:
            loop = Loop(first)
            assert loop.outcome(alice, alice.set(run, {"lr": 0.1})).result == "applied"
        with WeaveletProcess(run, url, trusted_keys=keys.trusted, heartbeat_interval=0.2) as second:
            reset = alice.get(run)
            assert reset is not None
            assert (reset.revision, reset.config, reset.signature) == (2, {}, "")  # the trainer's own, unsigned
            loop = Loop(second)
            written = alice.set(run, {"momentum": 0.9})
            assert written.config == {"momentum": 0.9}  # nothing of the earlier incarnation comes back
            assert loop.outcome(alice, written).result == "applied"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_in_a_training_loop_only_the_keys_stop_ends_the_fit(tmp_path: Path, keys: Keys) -> None:
    torch = pytest.importorskip("torch")
    from weavelet_torch import attach

    url, run = (tmp_path / "store").as_uri(), "loop"
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    with (
        Weaver(url) as anyone,
        Weaver(url, signing_key=keys.alice) as alice,
        attach(
            optimizer, run=run, url=url, report_interval=0.05, process_options={"trusted_keys": str(keys.trusted)}
        ) as live,
    ):
        step, written = 0, {}
        deadline = time.monotonic() + 2 * WAIT
        while not live.should_stop:
            assert time.monotonic() < deadline, f"the fit never stopped (step {step})"
            step += 1
            live.optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            live.optimizer.step()
            live.poll(step)
            if step == 5:
                written["unsigned"] = anyone.command(run, "stop")
            if "unsigned" in written and "at" not in written and step % 10 == 0:
                outcome = anyone.outcome(run, 1)
                if outcome is not None:
                    assert outcome.result == "rejected", outcome
                    written["at"] = step
            if "at" in written and step >= written["at"] + 20 and "signed" not in written:
                with pytest.warns(RuntimeWarning, match="revision 1 .* is unsigned; signed on top of an empty config"):
                    written["signed"] = alice.command(run, "stop")
            time.sleep(0.005)
        assert written["at"] + 20 <= step  # it trained on after the refused stop
        # The trainer has acted; its outcome reaches the store through the sidecar a moment later.
        stopped = alice.wait(run, 2, timeout=WAIT, revision_id=written["signed"].id)
        assert stopped.result == "applied"
        assert stopped.detail["signature"]["key"] == "alice"


def test_the_environment_names_the_signing_key(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEAVELET_SIGNING_KEY", str(keys.alice))
    with Weaver((tmp_path / "store").as_uri()) as weaver:
        assert weaver.signing_key is not None
        written = weaver.set("env", {"lr": 0.1})
    assert TrustedKeys.from_lines([Path(keys.trusted / "alice.pub").read_text()]).verify(written).ok
    monkeypatch.setenv("WEAVELET_SIGNING_KEY", str(tmp_path / "nowhere.key"))
    with pytest.raises(SigningError, match=r"WEAVELET_SIGNING_KEY: signing key .* does not exist"):
        Weaver((tmp_path / "store").as_uri())


def test_the_keys_stop_gets_through_over_an_unreadable_entry(tmp_path: Path, keys: Keys) -> None:
    from weavelet_file.transport import FileTransport

    url, run = (tmp_path / "store").as_uri(), "unreadable"
    with (
        Weaver(url, signing_key=keys.alice) as alice,
        Weaver(url) as anyone,
        WeaveletProcess(run, url, trusted_keys=keys.trusted, heartbeat_interval=0.2) as process,
    ):
        loop = Loop(process)
        assert loop.outcome(alice, alice.set(run, {"lr": 0.1})).result == "applied"
        loop.outcome(alice, anyone.set(run, {"lr": 10.0}))

        async def garbage() -> None:
            transport = FileTransport(url)
            await transport.connect()
            await transport.put_raw(run, 3, b"{not json")
            await transport.aclose()

        anyio.run(garbage)
        with pytest.warns(RuntimeWarning, match=r"revision 2 of run .* is unsigned; signed on top of revision 1") as w:
            stop = alice.command(run, "stop")
        assert len(w) == 1  # the unreadable entry is skipped as without signing; the unsigned one is said
        assert isinstance(stop, Revision)
        assert stop.revision == 4
        assert loop.outcome(alice, stop).result == "applied"
        assert loop.handed[-1].config["lr"] == 0.1  # built on revision 1, not on the unsigned revision 2


def _newest(weaver: Weaver, run: str, *, after: int, timeout: float = WAIT) -> Revision:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = weaver.get(run)
        if latest is not None and latest.revision > after:
            return latest
        time.sleep(0.02)
    raise AssertionError(f"no revision of run {run!r} after {after} in {timeout}s")


def test_the_trainers_own_writes_are_trusted_but_never_carry_a_forgery(
    url: str, run: str, keys: Keys, trainer: WeaveletProcess
) -> None:
    loop = Loop(trainer)
    with Weaver(url, signing_key=keys.alice) as alice, Weaver(url) as anyone:
        signed = alice.set(run, {"lr": 0.1})
        assert loop.outcome(alice, signed).result == "applied"

        # A rollback's rewrite (replace) on top of a signed revision: trusted as the trainer's own, applied.
        assert trainer.write({"lr": 0.05}, "weavelet rollback (test)", replace=True)
        own = _newest(anyone, run, after=signed.revision)
        assert own.config == {"lr": 0.05}
        assert not own.signature
        outcome = loop.outcome(alice, own)
        assert outcome.result == "applied", outcome
        assert outcome.detail["signature"]["local"] is True

        # A forger's revision, with a stop token for the live incarnation: refused ...
        token = {"token": "forged", "incarnation": trainer.incarnation}
        forged = anyone.set(run, {"lr": 9.0, "stop": token}, replace=True)
        assert loop.outcome(alice, forged).result == "rejected"
        # ... and the trainer's own writes never build on it: a merge is not written, a rewrite drops its tokens.
        assert trainer.write({"lr_scale": 0.5}, "weavelet spike guard (test)")
        assert trainer.write({"lr": 0.02}, "weavelet rollback (test)", replace=True)
        rewrite = _newest(anyone, run, after=forged.revision)
        assert rewrite.revision == forged.revision + 1, "the merge onto the forgery was not written"
        assert rewrite.config == {"lr": 0.02}, "no forged token rides along"
        assert loop.outcome(alice, rewrite).result == "applied"
        assert not any("stop" in r.config for r in loop.handed)
        assert trainer.state == "running"

        # A stored copy of the trainer's revision changed in place is no longer its own.
        tampered = dataclasses.replace(rewrite, revision=rewrite.revision + 1, config={"lr": 7.0})
        put(url, tampered)
        assert loop.outcome(alice, tampered).result == "rejected"
