//! What to exec for a container: binary, arguments, environment, working directory.

use super::*;

/// Kubernetes `$(VAR)` expansion: known names are replaced, `$$` escapes, others stay.
pub fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$(") {
            match t.find(')') {
                Some(end) if vars.contains_key(&t[..end]) => {
                    out.push_str(&vars[&t[..end]]);
                    rest = &t[end + 1..];
                }
                _ => {
                    out.push_str("$(");
                    rest = t;
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Image reference → repository (tag and digest stripped).
pub fn image_repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(colon) if !no_digest[colon..].contains('/') => &no_digest[..colon],
        _ => no_digest,
    }
}

pub(super) struct Launch {
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) cwd: PathBuf,
}

pub(super) async fn build_launch(
    ctx: &RuntimeCtx,
    node: &NodeCtx,
    pod: &Pod,
    c: &Container,
    mounts: &[(String, PathBuf)],
    pod_dir: &Path,
) -> Result<Launch, (String, String)> {
    let (ns, name) = pod_ns_name(pod);
    let image = c.image.clone().unwrap_or_default();
    let repo = image_repository(&image);
    let program = ctx.images.get(repo).cloned().ok_or_else(|| {
        (
            "ErrImagePull".to_string(),
            format!("the harness has no local binary for image repository {repo:?} (pass it in ClusterOptions::images)"),
        )
    })?;
    let config_err = |m: String| ("CreateContainerConfigError".to_string(), m);

    // Order as kubelet: envFrom, then env (later wins); $(VAR) sees earlier values.
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOSTNAME".into(), name.clone()),
        ("HOME".into(), pod_dir.display().to_string()),
        // The `kubernetes` Service, as on a real cluster (its ClusterIP answers inside every
        // node namespace; the Service proxy forwards it to the apiserver).
        (
            "KUBERNETES_SERVICE_HOST".into(),
            crate::netns::KUBERNETES_SERVICE_IP.into(),
        ),
        ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
        // Every node of this harness is a namespace on one host with one filesystem, so the
        // tests' shared SQLite file is safe; a real cluster needs SQL Server (the server refuses
        // sqlite:// in managed mode without this).
        ("IM_DATABASE__SQLITE_SINGLE_HOST".into(), "true".into()),
    ];
    if let Ok(v) = std::env::var("RUST_LOG") {
        env.push(("RUST_LOG".into(), v));
    }
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.secret_ref {
            match get_secret(ctx, &ns, &r.name).await.map_err(config_err)? {
                Some(s) => {
                    for (k, v) in secret_data(&s) {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(config_err(format!("secret \"{}\" not found", r.name))),
            }
        }
        if let Some(r) = &from.config_map_ref {
            match get_config_map(ctx, &ns, &r.name)
                .await
                .map_err(config_err)?
            {
                Some(cm) => {
                    for (k, v) in config_map_data(&cm) {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(config_err(format!("configmap \"{}\" not found", r.name))),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &vars_snapshot(&env))
        } else if let Some(from) = &e.value_from {
            if let Some(r) = &from.secret_key_ref {
                let secret = get_secret(ctx, &ns, &r.name).await.map_err(config_err)?;
                match secret
                    .as_ref()
                    .and_then(|s| secret_data(s).get(&r.key).cloned())
                {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(config_err(format!(
                            "couldn't find key {} in Secret {ns}/{}",
                            r.key, r.name
                        )))
                    }
                }
            } else if let Some(r) = &from.config_map_key_ref {
                let cm = get_config_map(ctx, &ns, &r.name)
                    .await
                    .map_err(config_err)?;
                match cm
                    .as_ref()
                    .and_then(|c| config_map_data(c).get(&r.key).cloned())
                {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(config_err(format!(
                            "couldn't find key {} in ConfigMap {ns}/{}",
                            r.key, r.name
                        )))
                    }
                }
            } else if let Some(f) = &from.field_ref {
                field_value(pod, node, f).map_err(config_err)?
            } else {
                // resourceFieldRef: the harness sets no resource limits.
                "0".into()
            }
        } else {
            String::new()
        };
        set(&mut env, e.name.clone(), value);
    }
    for (_, v) in env.iter_mut() {
        *v = rewrite_env_value(v, mounts);
    }
    let vars = vars_snapshot(&env);
    let mut args: Vec<String> = Vec::new();
    if let Some(cmd) = &c.command {
        args.extend(cmd.iter().skip(1).cloned());
    }
    args.extend(c.args.iter().flatten().cloned());
    let args = args
        .iter()
        .map(|a| rewrite_paths(&expand(a, &vars), mounts))
        .collect();
    let cwd = match &c.working_dir {
        Some(w) if !w.is_empty() => {
            let p = PathBuf::from(rewrite_paths(w, mounts));
            if p.is_absolute() && p.starts_with(pod_dir) {
                p
            } else {
                pod_dir.to_path_buf()
            }
        }
        _ => pod_dir.to_path_buf(),
    };
    std::fs::create_dir_all(&cwd)
        .map_err(|e| config_err(format!("create {}: {e}", cwd.display())))?;
    Ok(Launch {
        program,
        args,
        env,
        cwd,
    })
}

pub(super) fn vars_snapshot(env: &[(String, String)]) -> HashMap<String, String> {
    env.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables() {
        let vars: HashMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y$(B)$$(A)", &vars), "x1y$(B)$(A)");
    }

    #[test]
    fn strips_tags_and_digests() {
        assert_eq!(image_repository("test/http:latest"), "test/http");
        assert_eq!(image_repository("reg:5000/a/b:1.2"), "reg:5000/a/b");
        assert_eq!(image_repository("reg:5000/a/b"), "reg:5000/a/b");
        assert_eq!(image_repository("a/b@sha256:abc"), "a/b");
    }
}
