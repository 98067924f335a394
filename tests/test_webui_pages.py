"""The page itself and the model information it shows."""


def test_index_serves_the_chat_page(client):
    response = client.get("/")
    assert response.status_code == 200
    assert b"<html" in response.data.lower()


def test_model_info_names_the_loaded_model(model_client, default_model):
    info = model_client.get("/api/model").get_json()
    assert info == {"name": default_model.name, "context": default_model.max_seq_len,
                    "device": str(default_model.device), "kv_cache": "full", "adapters": []}


def test_model_info_without_a_model_is_a_clear_refusal(client):
    response = client.get("/api/model")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "no_model"


def test_model_info_needs_a_login_in_account_mode(auth_app):
    response = auth_app.test_client().get("/api/model")
    assert response.status_code == 401
