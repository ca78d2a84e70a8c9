"""`appliance keys new`, `appliance module bundle|sign|verify`."""
from __future__ import annotations

import sys
from pathlib import Path

from appliance.deploy.bundle import BundleRejected, make_bundle, open_bundle, sign_bundle
from appliance.deploy.keys import KeyFileError, load_private, new_pair, parse_public


def cmd_keys_new(args) -> int:
    try:
        private, public = new_pair(args.name, Path(args.dir))
    except KeyFileError as exc:
        print(f"appliance keys new: {exc}", file=sys.stderr)
        return 1
    print(f"private key {private} (mode 0600: keep it on the build machine, never on a gateway)")
    print(f"public key  {public}; for the gateways' YAML:\n\ndeploy:\n  trusted_keys:\n"
          f"    - \"{public.read_text().strip()}\"")
    return 0


def cmd_bundle(args) -> int:
    try:
        out = make_bundle(Path(args.wasm), Path(args.output) if args.output else None, natives=not args.no_native)
        bundle = open_bundle(out, trusted=(), allow_unsigned=True)
    except (BundleRejected, OSError) as exc:
        print(f"appliance module bundle: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: {bundle.module} {bundle.version}, files {', '.join(sorted(bundle.files))}, unsigned "
          f"(next: appliance module sign {out} --key KEY)")
    return 0


def cmd_sign(args) -> int:
    try:
        key = load_private(Path(args.key))
        bundle = sign_bundle(Path(args.bundle), key)
    except (KeyFileError, BundleRejected, OSError) as exc:
        print(f"appliance module sign: {exc}", file=sys.stderr)
        return 1
    print(f"{args.bundle}: {bundle.module} {bundle.version} signed by key {key.public.key_id} ({bundle.signer})")
    return 0


def cmd_verify(args) -> int:
    try:
        keys = [parse_public(Path(k).read_text()) if Path(k).exists() else parse_public(k) for k in args.key]
        bundle = open_bundle(Path(args.bundle), trusted=keys, allow_unsigned=False)
    except (BundleRejected, ValueError, OSError) as exc:
        print(f"{args.bundle}: refused: {exc}", file=sys.stderr)
        return 1
    print(f"{args.bundle}: {bundle.module} {bundle.version}, signed by {bundle.signer}, digest {bundle.digest[:16]}")
    return 0


def add_parsers(module_sub, top_sub) -> None:
    b = module_sub.add_parser("bundle", help="make a module bundle (.apb) of a built module, for deploying")
    b.add_argument("wasm", help="the built module (its manifest names it and its version)")
    b.add_argument("-o", "--output", help="the bundle (default: NAME-VERSION.apb next to the module)")
    b.add_argument("--no-native", action="store_true", help="leave out the native twins (nn-*.so) next to it")
    b.set_defaults(func=cmd_bundle)
    s = module_sub.add_parser("sign", help="sign a bundle with an Ed25519 key (appliance keys new)")
    s.add_argument("bundle")
    s.add_argument("--key", required=True, help="the private key file (NAME.key)")
    s.set_defaults(func=cmd_sign)
    v = module_sub.add_parser("verify", help="check a bundle as a gateway would: files, hashes, signature")
    v.add_argument("bundle")
    v.add_argument("--key", action="append", default=[], required=True,
                   help="a trusted public key (NAME.pub, or its line); repeatable")
    v.set_defaults(func=cmd_verify)

    keys = top_sub.add_parser("keys", help="signing keys for module bundles")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    n = ksub.add_parser("new", help="a new Ed25519 key pair: NAME.key (private, 0600) and NAME.pub")
    n.add_argument("name")
    n.add_argument("--dir", default=".", help="where to write them (default: here)")
    n.set_defaults(func=cmd_keys_new)
