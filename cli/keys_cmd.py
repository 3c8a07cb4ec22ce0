"""`freeference keys …`: manage API keys and read usage directly in Redis (same code as /admin)."""

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from api.keys import KeyLimits, KeyRecord, create_key, effective_limits, get_key, key_id_of, list_keys, update_key
from api.usage import read_usage
from cli.demo import data_dir_for, key_file, read_demo_key
from settings import get_settings
from settings.redis_url import redis_client


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `keys create|list|show|update|revoke|usage`."""
    keys = subparsers.add_parser("keys", help="create, list, update and revoke API keys; show usage")
    actions = keys.add_subparsers(dest="keys_action", required=True)
    create = actions.add_parser("create", help="create a key; prints it alone on the last line")
    create.add_argument("--name", required=True)
    create.add_argument("--tier", choices=["free", "pro"], default="free")
    _limit_flags(create)
    create.set_defaults(func=_create)
    listing = actions.add_parser("list", help="list keys (never their secret), one JSON object a line")
    listing.set_defaults(func=_list)
    show = actions.add_parser("show", help="one key's record and effective limits")
    show.add_argument("key_or_id")
    show.set_defaults(func=_show)
    update = actions.add_parser("update", help="change a key's tier or limits (0 = back to the tier default)")
    update.add_argument("key_or_id")
    update.add_argument("--tier", choices=["free", "pro"])
    _limit_flags(update, minimum=0)
    update.set_defaults(func=_update)
    revoke = actions.add_parser("revoke", help="revoke a key by its value or id")
    revoke.add_argument("key_or_id")
    revoke.set_defaults(func=_revoke)
    usage = actions.add_parser("usage", help="usage per day and model, for one key or all")
    usage.add_argument("key_or_id", nargs="?")
    usage.add_argument("--days", type=int, default=7)
    usage.set_defaults(func=_usage)
    demo = actions.add_parser("demo", help="print the demo key that `freeference serve --demo` printed")
    demo.set_defaults(func=_demo)


def _positive(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def _limit_flags(parser: argparse.ArgumentParser, minimum: int = 1) -> None:
    parser.add_argument("--rpm", type=_positive(minimum), help="requests per minute")
    parser.add_argument("--tpm", type=_positive(minimum), help="tokens per minute")
    parser.add_argument("--rpd", type=_positive(minimum), help="requests per day")
    parser.add_argument("--batch-lines", type=_positive(minimum), help="lines queued in unfinished batches")


def _run(action: Callable[[Redis], Awaitable[int]]) -> int:
    async def go() -> int:
        async with redis_client(get_settings().effective_redis_url) as redis:
            return await action(redis)

    return asyncio.run(go())


def _print_record(record: KeyRecord) -> None:
    limits = effective_limits(record, get_settings())
    print(json.dumps({**record.model_dump(), "effective_limits": limits.model_dump()}))


def _create(args: argparse.Namespace) -> int:
    async def action(redis: Redis) -> int:
        limits = KeyLimits(rpm=args.rpm, tpm=args.tpm, rpd=args.rpd, batch_lines=args.batch_lines)
        key, record = await create_key(redis, name=args.name, tier=args.tier, limits=limits)
        print(f"created {record.id} name={record.name} tier={record.tier} (the key is shown once)")
        print(key)
        return 0

    return _run(action)


def _list(_: argparse.Namespace) -> int:
    async def action(redis: Redis) -> int:
        for record in await list_keys(redis):
            _print_record(record)
        return 0

    return _run(action)


def _one_key(find: Callable[[Redis], Awaitable[KeyRecord | None]],
             show: Callable[[KeyRecord], None] = _print_record) -> int:
    """Run `find` (a lookup or an update) and show its record; exit 1 when there is no such key."""
    async def action(redis: Redis) -> int:
        record = await find(redis)
        if record is None:
            print("no such key")
            return 1
        show(record)
        return 0

    return _run(action)


def _show(args: argparse.Namespace) -> int:
    return _one_key(lambda redis: get_key(redis, args.key_or_id))


def _update(args: argparse.Namespace) -> int:
    given = {name: (value or None) for name in ("rpm", "tpm", "rpd", "batch_lines")
             if (value := getattr(args, name)) is not None}
    return _one_key(lambda redis: update_key(redis, args.key_or_id, tier=args.tier, limit_changes=given))


def _revoke(args: argparse.Namespace) -> int:
    return _one_key(lambda redis: update_key(redis, args.key_or_id, revoked=True),
                    lambda record: print(f"revoked {record.id}"))


def _usage(args: argparse.Namespace) -> int:
    async def action(redis: Redis) -> int:
        if args.key_or_id is None:
            ids = [r.id for r in await list_keys(redis)]
        elif await get_key(redis, args.key_or_id) is None:
            print("no such key")
            return 1
        else:
            ids = [key_id_of(args.key_or_id)]
        for usage in await read_usage(redis, ids, days=args.days):
            print(json.dumps(usage.model_dump()))
        return 0

    return _run(action)


def _demo(_: argparse.Namespace) -> int:
    settings = get_settings()
    data_dir = data_dir_for(settings)
    key = read_demo_key(settings.effective_redis_url, data_dir)
    if key is None:
        print(f"no demo key in {key_file(data_dir)} that the store knows: start `freeference serve --demo` "
              "(or `make serve`) first, or create a key with `freeference keys create`", file=sys.stderr)
        return 1
    print(key)
    return 0
