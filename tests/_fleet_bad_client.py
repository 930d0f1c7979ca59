"""The ClientApp of tests/test_fleet_deploy.py: tinytrain's own, except that a node started with
``--node-config corrupt=1`` cuts one output channel off its first array (a device on a stale plan),
so the server must reject its update."""
from flwr.app import Array
from flwr.clientapp import ClientApp

from tinytrain import fleet

APP = ClientApp()


@APP.train()
def train(msg, context):
    reply = fleet._deployed_train(msg, context)
    if str(context.node_config.get("corrupt", "")) == "1":
        arrays = reply.content["arrays"]
        key = next(iter(arrays))
        arrays[key] = Array(arrays[key].numpy()[:-1])
    return reply


@APP.evaluate()
def evaluate(msg, context):
    return fleet._deployed_evaluate(msg, context)
