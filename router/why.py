"""Why a request was served where it was: the candidates before the one that answered, and why not them.

One short line, the same in the `x-freeference-route` response header and the worker's debug
log: `<deployment>=<reason>, …` in the order they were considered. Reasons: `capability:<feature>`
(tools, vision, json, structured_outputs), `window` (the context does not fit), `unsupported:<field>`
(it refused something this request uses), `breaker` (open, or being probed by another worker),
`cooling` (a 429's wait, a model gone upstream), `quota` (no key with quota left), `gone`,
`hedge` (its first token was late and the next candidate's came first), `failed:<kind>`. Only
deployment names and these words: never anything of the request.
"""

import re
from collections.abc import Iterable, Mapping, Sequence

from router.select import Skip

MAX_ENTRIES = 6
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+\-]")


def summary(skipped: Sequence[Skip], notes: Iterable[tuple[str, str]], groups: Mapping[str, int], served: str,
            served_score: float) -> str:
    """The route line for a request served by `served`.

    `skipped`: what ranking left out (only those ranked before the served deployment are named:
    an earlier fallback group, or a score at least as high in the same group); `notes`: what the
    executor passed over or saw fail, in order; `groups`: deployment → its fallback group.
    """
    served_group = groups.get(served, 0)
    entries = [(s.deployment, s.reason) for s in skipped
               if (groups.get(s.deployment, 0), -s.score) <= (served_group, -served_score)]
    entries += [(d, reason) for d, reason in notes if d != served or reason.startswith("failed:")]
    unique = list(dict.fromkeys(entries))
    shown = [f"{_UNSAFE.sub('?', d)}={_UNSAFE.sub('?', reason)}" for d, reason in unique[:MAX_ENTRIES]]
    if len(unique) > MAX_ENTRIES:
        shown.append(f"+{len(unique) - MAX_ENTRIES} more")
    return ", ".join(shown)
