//! Deployment files, checked offline:
//! - the Kubernetes manifests of `deploy/k8s` pass strict schema validation with PyPI's
//!   `kubernetes-validate` (bundled schemas, no cluster; `deploy/k8s/validate.sh`
//!   installs it into `.venv`), and the validator really rejects a manifest with an
//!   unknown field (so a pass means something);
//! - the manifests agree with each other (Service name and ports, probes on gRPC health,
//!   GPU request, graceful termination, PVC for the sled store);
//! - the Dockerfiles are multi-stage, run as a non-root user, carry a HEALTHCHECK per
//!   role and pin the PyTorch version that `scripts/setup.sh` (and tch 0.26) uses;
//! - the Slurm scripts parse (`bash -n`).
//!
//! Network: only PyPI, once, to install `kubernetes-validate` (set
//! `DMQSM_SKIP_NETWORK_TESTS=1` to skip that part where PyPI is unreachable).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn kubernetes_manifests_validate_strictly_and_a_broken_one_is_rejected() {
    if std::env::var_os("DMQSM_SKIP_NETWORK_TESTS").is_some() {
        println!("SKIPPED kubernetes-validate: DMQSM_SKIP_NETWORK_TESTS is set");
        return;
    }
    let script = root().join("deploy/k8s/validate.sh");
    let out = Command::new("bash").arg(&script).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "validate.sh failed:\n{text}");
    assert!(text.contains("manifest files valid"), "{text}");

    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.yaml");
    let good = read("deploy/k8s/coordinator-service.yaml");
    std::fs::write(
        &bad,
        good.replacen("  type: ClusterIP", "  type: ClusterIP\n  portz: []", 1),
    )
    .unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&bad)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an unknown field passed validation:\n{text}"
    );
    assert!(text.contains("portz"), "{text}");
}

#[test]
fn kubernetes_manifests_agree_with_each_other_and_the_binaries() {
    let cm = read("deploy/k8s/configmap.yaml");
    let svc = read("deploy/k8s/coordinator-service.yaml");
    let sts = read("deploy/k8s/coordinator-statefulset.yaml");
    let dep = read("deploy/k8s/worker-deployment.yaml");
    // Workers dial the coordinator's Service on its gRPC port.
    assert!(cm.contains("DMQSM_COORDINATOR: \"http://dmqsm-coordinator.dmqsm.svc:50051\""));
    assert!(svc.contains("name: dmqsm-coordinator\n") && svc.contains("port: 50051"));
    assert!(sts.contains("serviceName: dmqsm-coordinator-headless"));
    // Coordinator: StatefulSet with a PVC for sled and probes on gRPC health.
    assert!(sts.contains("kind: StatefulSet") && sts.contains("volumeClaimTemplates:"));
    assert!(sts.contains("--data-dir=/data/store") && sts.contains("mountPath: /data"));
    for (text, port) in [(&sts, 50051), (&dep, 50061)] {
        for probe in ["readinessProbe:", "livenessProbe:"] {
            let at = text
                .find(probe)
                .unwrap_or_else(|| panic!("{probe} missing"));
            assert!(
                text[at..].starts_with(&format!(
                    "{probe}\n            grpc:\n              port: {port}"
                )),
                "{probe} is not a gRPC health probe on {port}"
            );
        }
        assert!(text.contains("requests:") && text.contains("limits:"));
        assert!(text.contains("runAsNonRoot: true"));
    }
    // Workers: Deployment, one GPU each, register with the Service, graceful stop.
    assert!(dep.contains("kind: Deployment"));
    assert_eq!(
        dep.matches("nvidia.com/gpu: 1").count(),
        2,
        "GPU request and limit"
    );
    assert!(dep.contains("--coordinator=$(DMQSM_COORDINATOR)"));
    assert!(dep.contains("--advertise=http://$(POD_IP):50061"));
    assert!(dep.contains("terminationGracePeriodSeconds: 120"));
    // Tokens come from one Secret: the coordinator's table as a file, the workers' token
    // as $DMQSM_TOKEN. Its placeholders are refused, so an unedited Secret fails closed.
    let secret = read("deploy/k8s/tokens-secret.yaml");
    assert!(secret.contains("kind: Secret") && secret.contains("name: dmqsm-tokens"));
    assert!(sts.contains("--tokens=/etc/dmqsm/tokens/tokens"));
    assert!(sts.contains("secretName: dmqsm-tokens") && sts.contains("key: tokens"));
    assert!(dep.contains("name: DMQSM_TOKEN\n") && dep.contains("key: worker-token"));
    let table: String = secret
        .split("tokens: |\n")
        .nth(1)
        .expect("a tokens: | block")
        .lines()
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    assert!(table.lines().count() >= 2, "{table}");
    let e = dmqsm_proto::auth::TokenTable::parse(&table, "secret").unwrap_err();
    assert!(e.to_string().contains("fields"), "{e}");
    let worker_token = secret
        .lines()
        .find_map(|l| l.strip_prefix("  worker-token: "))
        .expect("worker-token");
    assert!(dmqsm_proto::auth::Bearer::new(Some(worker_token)).is_err());
    // Every $(VAR) the containers use is defined by the ConfigMap or the pod env.
    for text in [&sts, &dep] {
        for part in text.split("$(").skip(1) {
            let var = &part[..part.find(')').unwrap()];
            assert!(
                cm.contains(&format!("  {var}: ")) || text.contains(&format!("- name: {var}\n")),
                "$({var}) is not defined"
            );
        }
    }
}

/// The stages of a Dockerfile: (name, body).
fn stages(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("FROM ") {
            let name = rest.split(" AS ").nth(1).unwrap_or("").trim().to_string();
            out.push((name, String::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    out
}

#[test]
fn dockerfiles_are_multi_stage_non_root_with_healthchecks_and_the_pinned_torch() {
    let setup = read("scripts/setup.sh");
    let torch = setup
        .lines()
        .find_map(|l| l.strip_prefix("TORCH_VERSION="))
        .expect("TORCH_VERSION in scripts/setup.sh")
        .trim_matches('"')
        .to_string();
    for file in [
        "deploy/docker/Dockerfile.cpu",
        "deploy/docker/Dockerfile.cuda",
    ] {
        let text = read(file);
        assert!(
            text.contains(&format!("ARG TORCH_VERSION={torch}")),
            "{file}: torch {torch}"
        );
        assert!(text.contains("--bin dmqsm --bin dmqsm-worker"), "{file}");
        let st = stages(&text);
        let names: Vec<&str> = st.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "coordinator-builder",
                "builder",
                "base",
                "coordinator",
                "runtime",
                "worker"
            ],
            "{file}"
        );
        // The coordinator image is built without torch and carries none.
        assert!(
            st[0].1.contains("-p dmqsm-coordinator --bin dmqsm") && !st[0].1.contains("torch"),
            "{file}: the coordinator builds without torch"
        );
        assert!(
            st[3].1.contains("COPY --from=coordinator-builder") && !st[3].1.contains("torch"),
            "{file}: the coordinator image holds no torch"
        );
        let runtime = &st[4].1;
        assert!(
            runtime.contains("USER 10001:10001"),
            "{file}: runtime must be non-root"
        );
        assert!(runtime.contains("COPY --from=builder"), "{file}");
        for (name, body) in [&st[3], &st[5]] {
            assert!(
                body.contains("HEALTHCHECK "),
                "{file}: {name} has no HEALTHCHECK"
            );
            assert!(body.contains("ENTRYPOINT "), "{file}: {name}");
            assert!(
                !body.contains("USER root") && !body.contains("USER 0"),
                "{file}: {name}"
            );
        }
        assert!(
            st[3]
                .1
                .contains("\"health\", \"--coordinator\", \"http://127.0.0.1:50051\"")
        );
        // Tokens come from mounted secrets; without them the servers refuse to listen
        // beyond loopback.
        assert!(
            st[3]
                .1
                .contains("ENV DMQSM_TOKENS_FILE=/run/secrets/dmqsm-tokens"),
            "{file}"
        );
        assert!(
            st[5]
                .1
                .contains("ENV DMQSM_TOKEN_FILE=/run/secrets/dmqsm-worker-token"),
            "{file}"
        );
        assert!(
            st[5]
                .1
                .contains("\"info\", \"--remote\", \"http://127.0.0.1:50061\"")
        );
        assert!(root().join(format!("{file}.dockerignore")).is_file());
    }
    assert!(read("deploy/docker/Dockerfile.cuda").contains("NVIDIA_DRIVER_CAPABILITIES=compute"));
    // The binaries the images build exist under those names.
    assert!(read("coordinator/Cargo.toml").contains("name = \"dmqsm\""));
    assert!(read("worker/Cargo.toml").contains("dmqsm-worker"));
}

#[test]
fn slurm_scripts_parse_and_configure_a_cons_tres_linuxproc_cluster() {
    for f in [
        "deploy/slurm/ci-install.sh",
        "deploy/slurm/dmqsm.sbatch",
        "deploy/slurm/dmqsm-workers.sbatch",
        "deploy/k8s/validate.sh",
    ] {
        let st = Command::new("bash")
            .arg("-n")
            .arg(root().join(f))
            .status()
            .unwrap();
        assert!(st.success(), "{f} does not parse");
    }
    let ci = read("deploy/slurm/ci-install.sh");
    for want in [
        "SelectType=select/cons_tres",
        "ProctrackType=proctrack/linuxproc",
        "hostname -s",
        "slurm-wlm",
        "munge",
    ] {
        assert!(ci.contains(want), "ci-install.sh lacks {want}");
    }
}
