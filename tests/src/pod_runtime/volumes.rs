//! Volumes: secrets, config maps, projected sources and the service-account token as files.

use super::*;

pub(super) async fn get_secret(
    ctx: &RuntimeCtx,
    ns: &str,
    name: &str,
) -> Result<Option<Secret>, String> {
    Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("get secret {ns}/{name}: {e}"))
}

pub(super) async fn get_config_map(
    ctx: &RuntimeCtx,
    ns: &str,
    name: &str,
) -> Result<Option<ConfigMap>, String> {
    Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("get configmap {ns}/{name}: {e}"))
}

pub(super) fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

pub(super) fn config_map_data(c: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = c
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in c.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

/// Writes `data` to `path` only when different; temp file + rename so readers never see a
/// half-written file.
pub(super) fn write_if_changed(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    if std::fs::read(path).ok().as_deref() == Some(data) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    }
    let tmp = path.with_extension("harness-tmp");
    std::fs::write(&tmp, data).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode));
    std::fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

pub(super) fn mode_of(m: Option<i32>) -> u32 {
    m.map(|m| m as u32).unwrap_or(0o644)
}

/// Writes keys (or the selected items) of a secret/config map into `dir`.
pub(super) fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    default_mode: u32,
) -> Result<(), String> {
    match items {
        Some(items) => {
            for it in items {
                let value = data
                    .get(&it.key)
                    .ok_or_else(|| format!("key {} not found", it.key))?;
                let mode = it.mode.map(|m| m as u32).unwrap_or(default_mode);
                write_if_changed(&dir.join(&it.path), value, mode)?;
            }
        }
        None => {
            for (k, v) in data {
                write_if_changed(&dir.join(k), v, default_mode)?;
            }
        }
    }
    Ok(())
}

pub(super) fn field_value(
    pod: &Pod,
    node: &NodeCtx,
    sel: &ObjectFieldSelector,
) -> Result<String, String> {
    let path = sel.field_path.as_str();
    let node_ip = node.net.node_ip.to_string();
    let label = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(|k| {
                map.as_ref()
                    .and_then(|m| m.get(k))
                    .cloned()
                    .unwrap_or_default()
            })
    };
    let v = match path {
        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
        "spec.nodeName" => node.name.clone(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.hostIP" | "status.podIPs" | "status.hostIPs" => node_ip,
        _ => {
            if let Some(v) = label(&pod.metadata.labels, "metadata.labels['") {
                v
            } else if let Some(v) = label(&pod.metadata.annotations, "metadata.annotations['") {
                v
            } else {
                return Err(format!("unsupported fieldRef {path}"));
            }
        }
    };
    Ok(v)
}

pub(super) async fn service_account_token(
    ctx: &RuntimeCtx,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> Result<String, String> {
    let (ns, name) = pod_ns_name(pod);
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(expiration.unwrap_or(3600).max(600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
    let resp = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .map_err(|e| format!("token for serviceaccount {ns}/{sa}: {e}"))?;
    resp.status
        .map(|s| s.token)
        .ok_or_else(|| "token request returned no token".into())
}

/// Creates/refreshes every volume of the pod under `<pod dir>/volumes/<name>`.
pub(super) async fn materialise_volumes(
    ctx: &RuntimeCtx,
    node: &NodeCtx,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<HashMap<String, PathBuf>, String> {
    let (ns, _) = pod_ns_name(pod);
    let mut out = HashMap::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in volumes {
        let dir = pod_dir.join("volumes").join(&v.name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            match get_secret(ctx, &ns, &name).await? {
                Some(secret) => write_keys(
                    &dir,
                    &secret_data(&secret),
                    s.items.as_ref(),
                    mode_of(s.default_mode),
                )?,
                None if s.optional == Some(true) => {}
                None => {
                    return Err(format!(
                        "MountVolume.SetUp failed for volume \"{}\": secret \"{name}\" not found",
                        v.name
                    ))
                }
            }
        } else if let Some(c) = &v.config_map {
            let name = c.name.clone();
            match get_config_map(ctx, &ns, &name).await? {
                Some(cm) => write_keys(
                    &dir,
                    &config_map_data(&cm),
                    c.items.as_ref(),
                    mode_of(c.default_mode),
                )?,
                None if c.optional == Some(true) => {}
                None => {
                    return Err(format!(
                    "MountVolume.SetUp failed for volume \"{}\": configmap \"{name}\" not found",
                    v.name
                ))
                }
            }
        } else if let Some(p) = &v.projected {
            let mode = mode_of(p.default_mode);
            for src in p.sources.iter().flatten() {
                if let Some(s) = &src.secret {
                    if let Some(secret) = get_secret(ctx, &ns, &s.name).await? {
                        write_keys(&dir, &secret_data(&secret), s.items.as_ref(), mode)?;
                    } else if s.optional != Some(true) {
                        return Err(format!("secret \"{}\" not found", s.name));
                    }
                }
                if let Some(c) = &src.config_map {
                    if let Some(cm) = get_config_map(ctx, &ns, &c.name).await? {
                        write_keys(&dir, &config_map_data(&cm), c.items.as_ref(), mode)?;
                    } else if c.optional != Some(true) {
                        return Err(format!("configmap \"{}\" not found", c.name));
                    }
                }
                if let Some(d) = &src.downward_api {
                    for it in d.items.iter().flatten() {
                        if let Some(f) = &it.field_ref {
                            let value = field_value(pod, node, f)?;
                            write_if_changed(&dir.join(&it.path), value.as_bytes(), mode)?;
                        }
                    }
                }
                if let Some(t) = &src.service_account_token {
                    let path = dir.join(&t.path);
                    // Requested once per pod: tokens are valid far longer than a test runs.
                    if !path.exists() {
                        let token = service_account_token(
                            ctx,
                            pod,
                            t.audience.clone(),
                            t.expiration_seconds,
                        )
                        .await?;
                        write_if_changed(&path, token.as_bytes(), mode)?;
                    }
                }
            }
        } else if let Some(d) = &v.downward_api {
            for it in d.items.iter().flatten() {
                if let Some(f) = &it.field_ref {
                    let value = field_value(pod, node, f)?;
                    write_if_changed(&dir.join(&it.path), value.as_bytes(), 0o644)?;
                }
            }
        }
        // emptyDir, hostPath, PVCs, ...: a plain per-pod directory.
        out.insert(v.name.clone(), dir);
    }
    Ok(out)
}
