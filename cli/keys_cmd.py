"""`freeference keys …`: manage API keys directly in Redis."""

import argparse
import asyncio
import json

from redis.asyncio import Redis

from api.keys import KeyLimits, create_key, list_keys, revoke_key
from settings import get_settings


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_action", required=True)
    create = actions.add_parser("create", help="create a key; prints it alone on the last line")
    create.add_argument("--name", required=True)
    create.add_argument("--tier", choices=["free", "pro"], default="free")
    create.add_argument("--rpm", type=int)
    create.add_argument("--tpm", type=int)
    create.add_argument("--rpd", type=int)
    create.set_defaults(func=_create)
    listing = actions.add_parser("list", help="list keys (never their secret)")
    listing.set_defaults(func=_list)
    revoke = actions.add_parser("revoke", help="revoke a key by its value or id")
    revoke.add_argument("key_or_id")
    revoke.set_defaults(func=_revoke)


def _redis() -> Redis:
    redis: Redis = Redis.from_url(get_settings().effective_redis_url)
    return redis


def _create(args: argparse.Namespace) -> int:
    async def go() -> str:
        async with _redis() as redis:
            limits = KeyLimits(rpm=args.rpm, tpm=args.tpm, rpd=args.rpd)
            key, record = await create_key(redis, name=args.name, tier=args.tier, limits=limits)
            print(f"created {record.id} name={record.name} tier={record.tier} (the key is shown once)")
            return key

    print(asyncio.run(go()))
    return 0


def _list(_: argparse.Namespace) -> int:
    async def go() -> None:
        async with _redis() as redis:
            for record in await list_keys(redis):
                print(json.dumps(record.model_dump()))

    asyncio.run(go())
    return 0


def _revoke(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with _redis() as redis:
            record = await revoke_key(redis, args.key_or_id)
            if record is None:
                print("no such key")
                return 1
            print(f"revoked {record.id}")
            return 0

    return asyncio.run(go())
