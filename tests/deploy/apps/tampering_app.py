"""A hospital's ClientApp that trains honestly but sends a NaN delta in one round.

Served by ``fedjax-med deploy client --app tampering_app:client_app`` in loopback_test.py (with
this folder on ``PYTHONPATH``), to show what the server does with a malformed update.
"""

import numpy as np
from flwr.app import Array
from flwr.clientapp import ClientApp

from fedjax_med.deploy import flower_app

CORRUPT_ROUND = 3  # 0-based: the fourth round

client_app = ClientApp()
client_app.query()(flower_app.query)
client_app.evaluate()(flower_app.evaluate)


@client_app.train()
def train(message, context):
    reply = flower_app.train(message, context)
    if int(message.content["round"]["round"]) == CORRUPT_ROUND:
        delta = reply.content["delta"]
        name = next(iter(delta.keys()))
        delta[name] = Array(np.full_like(delta[name].numpy(), np.nan))
    return reply
