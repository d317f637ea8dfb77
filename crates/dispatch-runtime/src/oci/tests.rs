use super::*;

fn entries(layer: &Layer) -> Vec<(String, u32, u64)> {
    let gz = flate2::read::GzDecoder::new(&layer.data[..]);
    let mut a = tar::Archive::new(gz);
    a.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                e.path().unwrap().display().to_string(),
                h.mode().unwrap(),
                h.mtime().unwrap(),
            )
        })
        .collect()
}

#[test]
fn layers_are_reproducible_sorted_and_carry_parents() {
    let build = || {
        let mut b = LayerBuilder::new();
        b.file(
            "/function/hello.py",
            0o644,
            &b"def handle(c, p): pass\n"[..],
        )
        .unwrap();
        b.file("/dispatch/bin/dispatch", 0o755, &b"\x7fELF"[..])
            .unwrap();
        b.finish("test").unwrap()
    };
    let (a, b) = (build(), build());
    assert_eq!(a.digest, b.digest, "same input, same bytes");
    assert_ne!(a.digest, a.diff_id);
    assert_eq!(
        entries(&a),
        [
            ("dispatch/".to_string(), 0o755, 0),
            ("dispatch/bin/".to_string(), 0o755, 0),
            ("dispatch/bin/dispatch".to_string(), 0o755, 0),
            ("function/".to_string(), 0o755, 0),
            ("function/hello.py".to_string(), 0o644, 0),
        ]
    );
    let mut c = LayerBuilder::new();
    c.file("/function/hello.py", 0o644, &b"other"[..]).unwrap();
    assert_ne!(c.finish("test").unwrap().digest, a.digest);
    for bad in ["", "/", "a/../b", "a//b", "./a"] {
        assert!(
            LayerBuilder::new().file(bad, 0o644, &b""[..]).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn config_gets_layers_env_and_entrypoint() {
    let mut config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin", "PYTHON_VERSION=3.11.7"], "Cmd": ["python3"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:base"]},
        "history": [{"created_by": "base"}]
    });
    let mut b = LayerBuilder::new();
    b.file("/x", 0o644, &b"x"[..]).unwrap();
    let layer = b.finish("add x").unwrap();
    let changes = ConfigChanges {
        env: vec![
            ("PATH".into(), "/dispatch/bin:/usr/bin".into()),
            ("PORT".into(), "8080".into()),
        ],
        entrypoint: vec!["/dispatch/bin/dispatch".into(), "runner".into()],
        exposed_ports: vec![8080],
        labels: BTreeMap::from([("dispatch.function".into(), "hello".into())]),
        ..Default::default()
    };
    apply_config(&mut config, std::slice::from_ref(&layer), &changes).unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!(["sha256:base", layer.diff_id])
    );
    assert_eq!(
        config["config"]["Env"],
        json!([
            "PYTHON_VERSION=3.11.7",
            "PATH=/dispatch/bin:/usr/bin",
            "PORT=8080"
        ])
    );
    assert_eq!(config["config"]["Cmd"], json!([]));
    assert_eq!(config["config"]["ExposedPorts"], json!({"8080/tcp": {}}));
    assert_eq!(config["history"][1]["created_by"], "add x");
    assert_eq!(config["config"]["Labels"]["dispatch.function"], "hello");
}

#[test]
fn docker_config_credentials() {
    let mut o = RegistryOptions::default();
    o.add_docker_config(
        br#"{"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
             "reg.local:5000": {"username": "u", "password": "p:w"}}}"#,
    )
    .unwrap();
    assert_eq!(o.auth["index.docker.io"], ("user".into(), "pass".into()));
    assert_eq!(o.auth["reg.local:5000"], ("u".into(), "p:w".into()));
    let err = o
        .add_docker_config(br#"{"auths": {"r": {"auth": "bm9jb2xvbg=="}}}"#)
        .unwrap_err();
    assert!(err.to_string().contains("not user:password"), "{err}");
    assert!(o.add_docker_config(b"{}").is_err());
}
