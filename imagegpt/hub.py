"""Uploading an export folder to the Hugging Face Hub: the repository id, what is sent, the token."""
import os

from imagegpt.errors import UserError
from imagegpt.huggingface import FILES


def check_repo_id(repo_id):
    """A repository id (name or owner/name), or a UserError naming --push_to_hub."""
    if not isinstance(repo_id, str) or not repo_id or repo_id.count("/") > 1 or \
            any(not part or part.startswith((".", "-")) or any(c.isspace() for c in part)
                for part in repo_id.split("/")):
        raise UserError(f"--push_to_hub: {repo_id!r} is not a repository id (name or owner/name)")


def upload_plan(folder, repo_id, private=False):
    """What push_to_hub() sends: {"repo_id", "private", "files": paths relative to folder}."""
    check_repo_id(repo_id)
    files = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                   for d, _, fs in os.walk(folder) for f in fs)
    missing = [f for f in FILES if f not in files]
    if missing:
        raise UserError(f"{folder}: not a complete export (missing {', '.join(missing)})")
    return {"repo_id": repo_id, "private": bool(private), "files": files}


def hub_token():
    """The token from HF_TOKEN or a stored `hf auth login`; a UserError when there is none."""
    try:
        import huggingface_hub   # optional: only an upload needs it
    except ImportError:
        raise UserError("--push_to_hub needs huggingface_hub (pip install huggingface_hub)") from None
    token = huggingface_hub.get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then retry")
    return token


def push_to_hub(folder, repo_id, private=False, token=None, log=print):
    """Create the repository (if needed) and upload the folder; returns the plan that was sent."""
    plan = upload_plan(folder, repo_id, private)
    token = token or hub_token()
    import huggingface_hub   # optional: hub_token() has said so when it is missing
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=plan["private"], repo_type="model", exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          allow_patterns=plan["files"], commit_message="Upload image GPT (GPT-2 format)")
    except Exception as e:  # HTTP errors, no network, bad token: all one line
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"upload to {repo_id} failed: {msg}") from None
    log(f"uploaded {len(plan['files'])} files to https://huggingface.co/{repo_id}"
        f"{' (private)' if plan['private'] else ''}")
    return plan
