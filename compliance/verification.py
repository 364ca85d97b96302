"""One verification of the whole governance record, for ``cxr audit verify`` and ``GET /v1/audit/verify``:
the audit chain (MACs, links, checkpoints kept outside the database, prediction/outcome row hashes) and
every e-signature against its audit entry."""
from __future__ import annotations

from typing import Any

from compliance.approvals import verify_signatures
from compliance.audit import verify_chain


def verify_all(database_url: str | None = None) -> dict[str, Any]:
    """``verify_chain().as_dict()`` + ``chain_ok`` + ``signature_problems``; ``ok`` only when both verify."""
    chain = verify_chain(database_url)
    sig_problems = verify_signatures()
    out = chain.as_dict()
    out["chain_ok"] = chain.ok
    out["signature_problems"] = sig_problems
    if chain.ok and sig_problems:
        out["ok"] = False
        out["status"] = "broken"
        out["first_bad_seq"] = sig_problems[0].get("audit_seq")
        out["message"] = (f"e-signature {sig_problems[0].get('signature_id')} (audit entry "
                          f"{sig_problems[0].get('audit_seq')}): {sig_problems[0]['problem']}")
    return out
