"""VOMS proxies on a gsi server that authorizes by VO (libXrdVoms, ``g /testvo`` in the
authdb), as EOS and dCache do: members may write, others are told permission denied, and VO
attributes that ended refuse a proxy that is still valid, which the preflight names first."""
from __future__ import annotations

import pytest

from ckpt_tasks.preflight import EXPIRED
from conftest import unavailable
from xrootd_auth import client_env, run_as
from xrootd_server import ServerUnavailable

PROMPT = 5.0


@pytest.fixture(scope="module")
def vo(make_auth_server, test_pki, tmp_path_factory):
    member, outsider = test_pki.user("vo-member"), test_pki.user("vo-outsider")
    directory = tmp_path_factory.mktemp("voms")
    try:
        proxies = {
            "member": test_pki.voms_proxy(member, directory / "member", voms_hours=2),
            "lapsed": test_pki.voms_proxy(member, directory / "lapsed", voms_hours=1, voms_started="2:00"),
        }
    except ServerUnavailable as error:
        unavailable(str(error))
    proxies["outsider"] = test_pki.proxy(outsider, directory / "outsider")
    server = make_auth_server(protocol="gsi", voms="testvo", authdb="g /testvo /vo a\n",
                              gridmap={member.subject: "member", outsider.subject: "outsider"})
    return server, proxies


def test_a_member_of_the_vo_saves_and_restores(vo, test_pki):
    server, proxies = vo
    env = client_env(test_pki, proxies["member"])
    location = f"{server.url}//vo/run"
    assert run_as(env, "save", location, "1")["ok"]
    assert run_as(env, "restore", location)["content"] == "step-1"


def test_a_proxy_without_the_vo_is_refused(vo, test_pki):
    server, proxies = vo
    answer = run_as(client_env(test_pki, proxies["outsider"]), "save", f"{server.url}//vo/run", "2")
    assert answer["error"] == "StoragePermissionDenied", answer
    assert answer["seconds"] < PROMPT


def test_ended_vo_attributes_refuse_a_valid_proxy_and_the_preflight_says_why(vo, test_pki):
    """The proxy itself is valid for hours; its VO attributes ended an hour ago. The server
    only says "permission denied"; the preflight names the expired VOMS attributes."""
    server, proxies = vo
    env = client_env(test_pki, proxies["lapsed"])
    answer = run_as(env, "save", f"{server.url}//vo/run", "3")
    assert answer["error"] == "StoragePermissionDenied", answer
    refused = run_as(env, "preflight", f"{server.url}//vo/run")
    assert refused["reason"] == EXPIRED, refused
    assert "VOMS attributes end first" in refused["message"]
