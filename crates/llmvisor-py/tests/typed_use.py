"""Type-checked by test_typing.py (mypy --strict): the stubs cover the documented API."""
import asyncio
import llmvisor

def main() -> None:
    with llmvisor.Supervisor("x.toml", state_dir="/tmp/s") as sup:
        url: str = sup.ensure_server_running("gemma", log_callback=print, timeout=5.0)
        with sup.lease("gemma") as lease:
            print(lease.url.upper(), url)
        for st in sup.status():
            print(st["state"])
        lines: list[str] = sup.logs("gemma")
        sup.shutdown_server("gemma", force=True)
    async def go() -> None:
        async with sup.lease_async("gemma") as l:
            print(l.model)
        l2 = await sup.acquire("gemma")
        l2.release()
    asyncio.run(go())
    llmvisor.get_global_server_manager("x.toml").close()
