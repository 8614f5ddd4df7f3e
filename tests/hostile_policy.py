"""A hostile policy behind an OpenAI-compatible chat endpoint: a fault injected on purpose.

Each task names an attack (``ATTACK: <name>`` in the user's message). The policy's first turn
calls the ``python`` tool with that attack's code, the way a model would (``message.tool_calls``,
finish reason ``tool_calls``); once a tool result is in the conversation, it answers. So every
hostile call goes through the real HTTP backend, the real episode runner and the real sandbox.
"""


import json  # no "from __future__ import annotations": FastAPI reads the handler's annotations at runtime
import re

ATTACKS = {
    "network": "import socket\ns = socket.create_connection(('93.184.216.34', 80), timeout=2)\nprint('connected')",
    "urllib": "import urllib.request\nprint(urllib.request.urlopen('http://example.com', timeout=2).read()[:100])",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "read_passwd": "print(open('/etc/passwd').read())",
    "read_repository": "print(open({repository!r}).read())",
    "write_outside": "open({escape!r}, 'w').write('escaped')\nprint('written')",
    "infinite_loop": "while True:\n    pass",
    "huge_output": "print('A' * 10_000_000)",
    "memory_bomb": "x = bytearray(8 * 1024 ** 3)\nprint(len(x))",
    "bad_arguments": None,  # arguments that are not JSON: the environment must refuse, not crash
    # A failing call that differs with the request's seed: the two episodes take different wrong
    # first steps under one prefix, and their alternatives are real, distinct, executed samples.
    "varied_error": "raise ValueError('variant {variant}')",
}
_TASK = re.compile(r"ATTACK: (\w+)")


def app(repository_file: str, escape_path: str):
    from fastapi import FastAPI, Request

    api = FastAPI()
    codes = {name: code.replace("{repository!r}", repr(repository_file)).replace("{escape!r}", repr(escape_path))
             if code else None for name, code in ATTACKS.items()}

    @api.post("/v1/chat/completions")
    async def complete(request: Request) -> dict:
        body = await request.json()
        messages = body["messages"]
        task = next(m["content"] for m in messages if m["role"] == "user")
        attack = _TASK.search(task).group(1)
        if messages[-1]["role"] == "tool":
            message, finish = {"role": "assistant", "content": "Done.\n<answer>1</answer>"}, "stop"
        else:
            code = codes[attack] and codes[attack].replace("{variant}", str(body["seed"] % 7))
            arguments = "{code: not json" if code is None else json.dumps({"code": code})
            message = {"role": "assistant", "content": f"Running {attack}.",
                       "tool_calls": [{"id": "call_0", "type": "function",
                                       "function": {"name": "python", "arguments": arguments}}]}
            finish = "tool_calls"
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}}

    return api
