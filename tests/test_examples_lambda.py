"""The Lambda deployment example: the CloudFormation template passes cfn-lint and says what
the README promises; the powertools handler publishes the counters (real redis-server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "examples" / "lambda_stream_stack.yaml"


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    """Run cfn-lint, the console script the test extra installs next to this Python."""
    script = Path(sys.executable).parent / "cfn-lint"
    assert script.exists(), "cfn-lint is missing: run `make venv` (it is in the test extra)"
    return subprocess.run(
        [str(script), "--", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_template_passes_cfn_lint() -> None:
    """cfn-lint (installed by the test extra) finds nothing to report."""
    done = cfn_lint(TEMPLATE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cfn_lint_does_catch_errors(tmp_path: Path) -> None:
    """The check above can fail: a broken copy of the template is reported."""
    broken = tmp_path / "broken.yaml"
    text = TEMPLATE.read_text(encoding="utf-8")
    broken.write_text(text.replace("Runtime: python3.11", "Runtime: python2.0"), encoding="utf-8")
    done = cfn_lint(broken)
    assert done.returncode != 0 and "python2.0" in done.stdout


def test_template_has_the_documented_settings() -> None:
    """Partial batch responses, a VPC, least-privilege stream reads, a failure destination."""
    from cfnlint.decode import cfn_yaml

    resources = cfn_yaml.load(str(TEMPLATE))["Resources"]
    mapping = resources["StreamMapping"]["Properties"]
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert "OnFailure" in mapping["DestinationConfig"]
    function = resources["Function"]["Properties"]
    assert set(function["VpcConfig"]) == {"SubnetIds", "SecurityGroupIds"}
    assert function["Handler"] == "lambda_stream_handler.handler"
    assert {"SWR_CACHE_REDIS_URL", "SWR_CACHE_NAMESPACE"} <= set(
        function["Environment"]["Variables"]
    )
    role = resources["FunctionRole"]["Properties"]
    actions = {
        action
        for policy in role["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
        for action in (
            [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        )
    }
    assert {
        "dynamodb:GetRecords",
        "dynamodb:GetShardIterator",
        "dynamodb:DescribeStream",
    } <= actions
    assert not any(a.endswith("*") for a in actions)
    assert "AWSLambdaVPCAccessExecutionRole" in json.dumps(role["ManagedPolicyArns"])


@pytest.mark.redis
def test_powertools_handler_publishes_counters(redis_url: str) -> None:
    """Each invocation prints one EMF line with what the counters gained in it."""
    env = {**os.environ, "SWR_CACHE_REDIS_URL": redis_url}
    env.pop("SWR_CACHE_NAMESPACE", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lambda_powertools.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    emf: list[dict[str, Any]] = [
        json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"_aws"')
    ]
    assert len(emf) == 2  # one per invocation
    for doc in emf:
        assert doc["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "swr_cache"
        assert doc["stream_records_applied"] == [3.0]  # deltas, not running totals
    assert done.stdout.count("'batchItemFailures': []") == 2
