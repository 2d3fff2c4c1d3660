"""Scale-out under `torchrun`: harvests split by data, suites split by SAE, DDP for one big SAE,
and suites published to object stores. A single process is a world of one: every helper here then
does exactly what the plain single-process call does. Guide: docs/scaling.md.

    torchrun --nproc-per-node 8 -m lmscope harvest --sites all.resid_post --out s3://b/acts
    torchrun --nproc-per-node 8 -m lmscope train --store s3://b/acts --config suite.toml --out runs/s
"""

from lmscope.distributed.context import DistributedError, Ranks, init, session
from lmscope.distributed.harvest import count_blocks, harvest_parts, merge_parts, split_range
from lmscope.distributed.remote import RemoteError, fetch_suite, is_remote, publish_suite
from lmscope.distributed.train import DataParallel, Group, plan_suite, train_parts

__all__ = [
    "DataParallel",
    "DistributedError",
    "Group",
    "Ranks",
    "RemoteError",
    "count_blocks",
    "fetch_suite",
    "harvest_parts",
    "init",
    "is_remote",
    "merge_parts",
    "plan_suite",
    "publish_suite",
    "session",
    "split_range",
    "train_parts",
]
