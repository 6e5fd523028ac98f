-- Announces every change to a session other than a use (last_seen_at), and every policy change,
-- on a channel of the schema, in the transaction of the change: listeners (the nodes' session
-- caches) hear of it when, and only if, it commits. The payload is the session's handle, or '*'
-- for a policy change (everything cached may depend on it).
CREATE FUNCTION session_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(left('sdc_' || TG_TABLE_SCHEMA, 63), OLD.handle);
    RETURN NULL;
END
$$;

CREATE TRIGGER session_changed AFTER UPDATE ON sessions FOR EACH ROW
    WHEN ((to_jsonb(OLD) - 'last_seen_at') IS DISTINCT FROM (to_jsonb(NEW) - 'last_seen_at'))
    EXECUTE FUNCTION session_changed();

CREATE TRIGGER session_deleted AFTER DELETE ON sessions FOR EACH ROW
    EXECUTE FUNCTION session_changed();

CREATE FUNCTION policy_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(left('sdc_' || TG_TABLE_SCHEMA, 63), '*');
    RETURN NULL;
END
$$;

CREATE TRIGGER policy_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON policies
    FOR EACH STATEMENT EXECUTE FUNCTION policy_changed();
