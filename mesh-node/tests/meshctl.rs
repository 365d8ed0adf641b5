//! `meshctl analyze` as an operator runs it: the binary, its output and its exit codes.

use std::process::Command;

fn meshctl(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("running meshctl");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_examples_analyze_clean_and_a_broken_file_fails() {
    let (code, out) = meshctl(&["analyze", "examples/bookinfo"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No validation issues found"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n  - timeout: forever\n    route: [{destination: {host: reviews}}]\n",
    )
    .unwrap();
    let path = dir.path().display().to_string();
    let (code, out) = meshctl(&["analyze", &path]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("Error [IST0106] (VirtualService default/reviews ")
            && out.contains("broken.yaml:1) rejected by Weft: spec.http[0].timeout"),
        "{out}"
    );
    let (code, out) = meshctl(&["analyze", "--json", &path]);
    assert_eq!(code, 1, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["findings"][0]["level"], "Error");
    assert_eq!(
        json["findings"][0]["resource"],
        "VirtualService default/reviews"
    );

    let (code, out) = meshctl(&["analyze", "/nonexistent/weft"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot read /nonexistent/weft"), "{out}");
}
