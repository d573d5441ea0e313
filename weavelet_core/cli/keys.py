"""``weavelet keygen``: make an Ed25519 key pair for signed revisions (see :mod:`weavelet_core.signing`)."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from weavelet_core.cli import output
from weavelet_core.cli.common import EXIT_OK, add_output, wants_json


def cmd_keygen(args: argparse.Namespace, out: TextIO) -> int:
    from weavelet_core import signing

    private, public = signing.keygen(args.name, args.dir)
    key = signing.load_signing_key(private)
    where = private.resolve()
    if wants_json(args):
        output.print_json(
            {"name": args.name, "key_id": key.key_id, "private_key": str(private), "public_key": str(public)}, out
        )
        return EXIT_OK
    out.write(f"wrote {private} (the private key, mode 0600: keep it secret; it signs as {args.name})\n")
    out.write(f"wrote {public} (the public key {args.name}, {key.key_id})\n")
    out.write(
        f"next: give {public.name} to the trainers that should accept this key (trusted_keys=, or "
        f"WEAVELET_TRUSTED_KEYS=DIR), and sign writes with it: weavelet set --signing-key {where} RUN KEY=VALUE "
        f"(or export WEAVELET_SIGNING_KEY={where})\n"
    )
    return EXIT_OK


def add_parsers(subparsers: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = subparsers.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing revisions",
        description="Write NAME.key (the private key, OpenSSH format, mode 0600) and NAME.pub (the public key line "
        "'ssh-ed25519 BASE64 NAME'; NAME is shown as the author of what the key signs). Never overwrites: an "
        "existing NAME.key or NAME.pub is an error. Trainers given NAME.pub (trusted_keys=, "
        "WEAVELET_TRUSTED_KEYS) accept only revisions signed by a trusted key; sign with --signing-key NAME.key "
        'or WEAVELET_SIGNING_KEY. Needs the signing extra: pip install "weavelet[signing]".',
        epilog="""examples:
  weavelet keygen alice --dir ~/.config/weavelet/keys
  weavelet set demo lr=0.01 --signing-key ~/.config/weavelet/keys/alice.key --wait 30
""",
        formatter_class=formatter,
    )
    add_output(p)
    p.add_argument("name", metavar="NAME", help="the key's name: 1-64 characters from A-Z a-z 0-9 _ . @ -")
    p.add_argument("--dir", default=".", metavar="DIR", help="where to write the pair (default: the current directory)")
    p.set_defaults(handler=cmd_keygen, is_async=False)


__all__ = ["add_parsers", "cmd_keygen"]
