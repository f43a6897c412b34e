"""Named objects through the real client and app: delete, and what the client forgets."""

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
import statehost.client
from tests.core.models import PARAM, Affine
from tests.inprocess import TOKEN, URL

LANES = 8
PMAP = dict(axis_name="i", in_axes=0, out_axes=0, state_in_axes={0: PARAM},
            state_out_axes={0: PARAM})


@pytest.fixture
def other(transport):
    """A second client (another kernel) of the same server."""
    with statehost.connect(URL, token=TOKEN, transport=transport, dispatch="sync") as other:
        yield other


def test_delete_then_put_uploads_the_states_again(client):
    model = Affine(LANES)
    client.put("team/x", model)
    client.delete("team/x")
    with pytest.raises(statehost.client.NotFoundError, match="no object 'x'"):
        client.info("team/x")
    client.put("team/x", model)
    states = client.info("team/x")["states"]
    assert [s["status"] for s in states] == ["ok"]
    assert states[0]["id"] == model.weight.id


def test_delete_then_call_uploads_the_states_again(client):
    model = Affine(LANES)
    client.put("team/x", model)
    step = client.pmap(model, **PMAP)
    step(jnp.ones((LANES, 4)))
    client.delete("team/x")
    step(jnp.ones((LANES, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 3.0))


def test_delete_answers_the_ids_it_deleted(client, transport):
    model = Affine(LANES)
    client.put("team/x", model)
    with httpx.Client(base_url=URL, transport=transport) as http:
        answer = http.delete("/v1/namespaces/team/objects/x",
                             headers={"authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert answer.json() == {"name": "team/x", "deleted": [model.weight.id]}


def test_a_call_after_another_client_deleted_the_object_uploads_the_states(client, other):
    model = Affine(LANES)
    client.put("team/x", model)
    step = client.pmap(model, **PMAP)
    step(jnp.ones((LANES, 4)))
    other.delete("team/x")  # this client does not know
    step(jnp.ones((LANES, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 3.0))
    client.put("team/x", model)  # and the put after it uploads them too
    assert client.info("team/x")["states"][0]["status"] == "ok"


def test_values_only_the_server_had_are_reported_lost_and_then_uploaded(client, other):
    model = Affine(LANES)
    client.put("team/x", model)
    lazy = client.pmap(model, pull=False, **PMAP)
    lazy(jnp.ones((LANES, 4)))  # the newest value (2.0) is on the server only
    other.delete("team/x")
    with pytest.raises(statehost.client.StateNotFoundError,
                       match=r"(?s)no longer on the server.*newest values.*are gone.*re-running "
                             r"the call uploads") as info:
        lazy(jnp.ones((LANES, 4)))
    assert info.value.missing == [model.weight.id]
    np.testing.assert_array_equal(model.weight.value, np.ones((LANES, 4)))
    lazy(jnp.ones((LANES, 4)))  # as the message says: the local value (1.0) is uploaded
    client.pull(model)
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 2.0))


def test_pull_of_a_deleted_state_says_what_to_do_and_it_works(client, other):
    model = Affine(LANES)
    client.put("team/x", model)
    other.delete("team/x")
    with pytest.raises(statehost.client.StateNotFoundError, match="re-run the call"):
        client.pull(model)
    client.pmap(model, **PMAP)(jnp.ones((LANES, 4)))  # the re-run the message offers
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 2.0))
