//! The demo passes end to end (the README's third command).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_every_step_as_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let report = examples::demo::run(dir.path().join("dev")).await.expect("demo");
    println!("logout to refused: {:?}", report.logout_to_refused);
}
