"""Every ```python block in README.md is a complete program that runs against real servers."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.redis, pytest.mark.dynamodb]

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    """``(heading above the block, code)`` for each python block, in order."""
    text = README.read_text(encoding="utf-8")
    out = []
    for match in _BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        out.append((headings[-1] if headings else "top", match.group(1)))
    return out


BLOCKS = python_blocks()


def test_the_readme_has_its_examples() -> None:
    """The quickstart and the sections' examples are all there (the ids below are not empty)."""
    headings = [h for h, _ in BLOCKS]
    assert headings[0] == "Quickstart"
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(code, id=f"{i}-{re.sub(r'[^a-z]+', '-', h.lower()).strip('-')}")
        for i, (h, code) in enumerate(BLOCKS)
    ],
)
async def test_readme_block_runs(
    code: str,
    redis_url: str,
    dynamodb_client: Any,
    dynamodb_endpoint: str,
    redis_cluster: Any,
    tmp_path: Path,
) -> None:
    """The block is a whole program (imports, ``async def main``, ``asyncio.run``) and exits 0."""
    assert "async def main(" in code and "asyncio.run(main())" in code, code[:200]
    assert re.search(r"^import asyncio$", code, re.M), "the block must import what it uses"
    if "create_table" not in code:  # the quickstart creates them; the others expect them
        await _create_tables(dynamodb_client)
    redis_cluster.flushall()
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {
        **os.environ,
        "SWR_CACHE_REDIS_URL": redis_url,
        "REDIS_CLUSTER_URL": redis_cluster.url,
        "AWS_ENDPOINT_URL": dynamodb_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    env.pop("SWR_CACHE_NAMESPACE", None)
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip(), "an example shows what it did"


async def _create_tables(dynamodb: Any) -> None:
    """The tables the README's quickstart creates."""
    for name, keys, types in (
        ("Users", ["pk"], ["S"]),
        ("Orders", ["customer_id", "order_id"], ["S", "N"]),
    ):
        await dynamodb.create_table(
            TableName=name,
            KeySchema=[
                {"AttributeName": k, "KeyType": t}
                for k, t in zip(keys, ["HASH", "RANGE"], strict=False)
            ],
            AttributeDefinitions=[
                {"AttributeName": k, "AttributeType": t} for k, t in zip(keys, types, strict=True)
            ],
            BillingMode="PAY_PER_REQUEST",
        )
